"""What GRPO and PPO share around their update rule: the rollout config fields, the setup of
rewards, sampler and prompt plan, and the greedy exact-match evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from fastpeft.reasoning.types import Generator, SamplingParams
from fastpeft.training.data import BatchPlan, load_records
from fastpeft.training.evaluate import exact_match
from fastpeft.training.rewards.multi_objective import MultiObjectiveReward, build_reward
from fastpeft.training.rl_common import RecipeConfig, RunContext


@dataclasses.dataclass
class RolloutConfig(RecipeConfig):
    """Fields of every recipe that samples from its policy (``fastpeft grpo`` / ``fastpeft ppo``)."""

    rewards: dict = dataclasses.field(default_factory=lambda: {"arithmetic": 1.0})  # name -> weight
    reward_options: dict = dataclasses.field(default_factory=dict)
    prompts_per_step: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    mask_truncated: bool = False
    eval_match: Literal["answer", "exact"] = "answer"
    eval_max_examples: int | None = 200
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prompts_per_step", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (log-probs are taken at the sampling temperature), "
                             f"got {self.temperature}")  # fmt: skip

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=seed)  # fmt: skip


@dataclasses.dataclass
class RolloutSetup:
    """The pieces a rollout recipe's loop needs, built once by :func:`setup_rollouts`."""

    reward: MultiObjectiveReward
    sampler: Generator
    records: list[dict]
    eval_records: list[dict]
    plan: BatchPlan  # prompts_per_step prompts per step, this rank's share


def setup_rollouts(ctx: RunContext, config: RolloutConfig, reward: MultiObjectiveReward | None,
                   sampler: Generator | None) -> RolloutSetup:  # fmt: skip
    """Rewards (``config.rewards`` unless given), the sampler (the batched KV-cache sampler on the
    policy unless given), training and evaluation records, and the per-step prompt plan."""
    if config.train_data is None:
        raise ValueError("train_data is required (records with a prompt, plus what the rewards need)")
    reward = reward or build_reward(config.rewards, **config.reward_options)
    if sampler is None:
        from fastpeft.reasoning.sampler import Sampler

        sampler = Sampler(ctx.model, ctx.tokenizer, max_seq_len=config.max_seq_len)
    records = load_records(config.train_data)
    eval_records = load_records(config.eval_data) if config.eval_data is not None else []
    eval_records = eval_records[: config.eval_max_examples] if config.eval_max_examples else eval_records
    plan = BatchPlan(records, config.prompts_per_step, 1, ctx.world_size, ctx.rank, config.seed)
    return RolloutSetup(reward, sampler, records, eval_records, plan)


def evaluate_exact_match(ctx: RunContext, records: list[dict], config: RolloutConfig) -> dict[str, Any]:
    """Greedy exact match of the policy on ``records`` (rank 0 only; ``{}`` elsewhere or without records)."""
    if not records or not ctx.main:
        return {}
    em = exact_match(ctx.model, ctx.tokenizer, records, config.eval_match, config.max_new_tokens,
                     config.eval_batch_size, ctx.device)  # fmt: skip
    return {"exact_match": em["exact_match"], "eval_n": em["n"]}
