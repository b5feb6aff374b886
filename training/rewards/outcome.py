"""Outcome rewards: judge only the final result of a completion.

The final answer is read by :func:`fastpeft.reasoning.answers.extract_answer` (``answer 85``,
``answer: 85``, ``#### 85``, ``\\boxed{85}``; numbers compared exactly), the format the bundled
arithmetic task writes; code tasks use :class:`fastpeft.training.rewards.code_sandbox.CodeReward`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastpeft.reasoning.answers import extract_answer, has_answer_marker, is_correct


def answer_reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
    """1.0 when the completion's final answer equals ``record["answer"]``, else 0.0."""
    if "answer" not in record:
        raise KeyError("answer_reward needs record['answer']")
    return 1.0 if is_correct(completion, record["answer"]) else 0.0


arithmetic_reward = answer_reward  # its name before the bundled arithmetic task moved to the demo


def answer_format_reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
    """1.0 when the completion states a final answer explicitly (``answer N``, ``#### N``, ...), else 0.0."""
    return 1.0 if has_answer_marker(completion) and extract_answer(completion) is not None else 0.0
