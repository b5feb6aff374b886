"""Outcome rewards: judge only the final result of a completion.

For the bundled arithmetic task (:mod:`fastpeft.training.arithmetic`) the reward is exact
final-answer match through its ``extract_answer`` / ``is_correct``; code tasks use
:class:`fastpeft.training.rewards.code_sandbox.CodeReward`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastpeft.training.arithmetic import extract_answer, is_correct


def arithmetic_reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
    """1.0 when the number after the completion's last ``answer`` equals ``record["answer"]``, else 0.0."""
    if "answer" not in record:
        raise KeyError("arithmetic_reward needs record['answer']")
    return 1.0 if is_correct(completion, record["answer"]) else 0.0


def answer_format_reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
    """1.0 when the completion states a final answer in the task's format (``answer N``), else 0.0."""
    return 1.0 if extract_answer(completion) is not None else 0.0
