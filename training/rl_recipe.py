"""What GRPO and PPO share around their update rule: the rollout config fields, the set-up of
rewards, sampler and prompt plan, sampling on the training path, and the greedy evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fastpeft.reasoning.types import Generator, SamplingParams
from fastpeft.training import distributed as dist_utils
from fastpeft.training.data import BatchPlan, load_records
from fastpeft.training.evaluate import greedy_completions, judge
from fastpeft.training.loop import RecipeRun
from fastpeft.training.recipe import RecipeConfig, RunContext
from fastpeft.training.rewards.multi_objective import BUILTIN_REWARDS, MultiObjectiveReward, build_reward
from fastpeft.training.rollout import RolloutBatch, generate_rollouts


@dataclasses.dataclass
class RolloutConfig(RecipeConfig):
    """Fields of every recipe that samples from its policy (``fastpeft grpo`` / ``fastpeft ppo``).

    ``micro_batch_size``: completions per forward/backward (the loss runs over micro-batches of
    completions, so the number of completions per step never sets the activation memory).
    """

    rewards: dict = dataclasses.field(default_factory=dict)  # built-in reward name -> weight
    reward_options: dict = dataclasses.field(default_factory=dict)
    prompts_per_step: int = 8  # per rank
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    mask_truncated: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prompts_per_step", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (log-probs are taken at the sampling temperature), got {self.temperature}"
            )
        if self.grad_accum_steps != 1:
            raise ValueError(
                "grad_accum_steps applies to the dataset recipes; a rollout step's completions are "
                "already accumulated over micro-batches (micro_batch_size), set prompts_per_step "
                "for a bigger step"
            )

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=seed,
        )


@dataclasses.dataclass
class RolloutSetup:
    """The pieces a rollout recipe's loop needs, built once by :func:`setup_rollouts`."""

    reward: MultiObjectiveReward
    sampler: Generator
    records: list[dict]
    eval_records: list[dict]
    plan: BatchPlan  # prompts_per_step prompts per rank and step

    @property
    def layout(self) -> dict[str, int]:
        return {"prompts": len(self.plan.rows), "global_prompts_per_step": self.plan.global_batch}


def resolve_reward(config: RolloutConfig, reward: MultiObjectiveReward | None) -> MultiObjectiveReward:
    """``reward``, else the one ``config.rewards`` names; a run with neither stops here, before any
    model is loaded. The library has no default reward: what is right depends on the task."""
    if reward is not None:
        return reward
    if not config.rewards:
        raise ValueError(
            f"no reward configured: set rewards (built-in: {', '.join(BUILTIN_REWARDS)}; e.g. "
            "--set rewards.answer=1.0) or pass reward= to train()"
        )
    return build_reward(config.rewards, **config.reward_options)


def setup_rollouts(
    ctx: RunContext, config: RolloutConfig, reward: MultiObjectiveReward, sampler: Generator | None
) -> RolloutSetup:
    """The sampler (the batched KV-cache sampler on the policy itself unless given: the same NF4
    weights and adapters the step trains), training and evaluation records, and the per-step plan."""
    if config.train_data is None:
        raise ValueError("train_data is required (records with a prompt, plus what the rewards need)")
    if sampler is None:
        from fastpeft.reasoning.sampler import Sampler

        sampler = Sampler(ctx.model, ctx.tokenizer, max_seq_len=config.max_seq_len)
    records = load_records(config.train_data)
    eval_records = load_records(config.eval_data) if config.eval_data is not None else []
    eval_records = eval_records[: config.eval_max_examples] if config.eval_max_examples else eval_records
    plan = BatchPlan(records, config.prompts_per_step, 1, ctx.world_size, ctx.rank, config.seed)
    return RolloutSetup(reward, sampler, records, eval_records, plan)


def sample_step(run: RecipeRun, setup: RolloutSetup, config: RolloutConfig, step: int, group_size: int) -> RolloutBatch:
    """This rank's rollouts of ``step``: ``group_size`` samples of each of its prompts, each prompt's
    KV prefilled once and read by its samples (the sampler's shared-prefix decode). It runs between
    two updates: the previous backward's activations and gradients are already freed. Under FSDP
    the ranks sample independently from gathered parameters (no collectives while decoding)."""
    ctx = run.ctx
    seed = (config.seed * 1_000_003 + step) * max(ctx.world_size, 1) + ctx.rank
    with dist_utils.full_parameters(run.runner, for_forward=True):
        batch = generate_rollouts(
            setup.sampler, ctx.tokenizer, setup.plan.micro_batches(step)[0], group_size, config.sampling(seed)
        )
    return batch


def gather_rows(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's ``values`` ``[n, ...]`` (the same n on each), concatenated in rank order."""
    if not dist_utils.is_distributed():
        return values
    import torch.distributed as dist

    local = values.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(values.device)


def evaluate_policy(
    ctx: RunContext, records: list[dict], config: RolloutConfig, reward: MultiObjectiveReward
) -> dict[str, Any]:
    """Greedy continuations of ``records``' prompts: their mean reward under the run's reward
    (``eval_reward_mean``) and, on records with an ``"answer"``, exact match (``eval_match``)."""
    if not records:
        return {}
    prompts = [str(r["prompt"]) for r in records]
    texts = greedy_completions(
        ctx.model, ctx.tokenizer, prompts, config.max_new_tokens, config.eval_batch_size, ctx.device
    )
    out: dict[str, Any] = {
        "eval_reward_mean": reward(prompts, texts, records).summary()["reward_mean"],
        "eval_n": len(records),
    }
    answered = [(t, r) for t, r in zip(texts, records) if "answer" in r]
    if answered:
        out["exact_match"] = sum(judge(t, r["answer"], config.eval_match) for t, r in answered) / len(answered)
    return out
