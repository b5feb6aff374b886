"""Rewards for the RL recipes: outcome (exact answer, sandboxed code), process (per-step), multi-objective
combination with skip-on-failure, and reward-hacking safeguards.

A reward function is ``fn(prompt: str, completion: str, record: Mapping) -> float`` (``record`` is the
dataset row, e.g. with ``"answer"`` or ``"tests"``); :class:`MultiObjectiveReward` combines several.
"""

from fastpeft.training.rewards.code_sandbox import (
    CodeReward,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailableError,
    run_tests_in_sandbox,
)
from fastpeft.training.rewards.multi_objective import MultiObjectiveReward, RewardBatch, build_reward
from fastpeft.training.rewards.outcome import answer_format_reward, answer_reward, arithmetic_reward

__all__ = [
    "CodeReward",
    "MultiObjectiveReward",
    "RewardBatch",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailableError",
    "answer_format_reward",
    "answer_reward",
    "arithmetic_reward",
    "build_reward",
    "run_tests_in_sandbox",
]
