"""GRPO: group-relative policy optimisation on a (Q)LoRA policy with verifiable rewards.

One step (per rank; ranks take different prompts, DDP averages gradients):

1. ``prompts_per_step`` prompts from the training records, ``num_generations`` (G) samples each
   from the batched sampler on the current policy (:func:`~fastpeft.training.rl_recipe.sample_step`:
   the same NF4 weights and adapters; each prompt's KV prefilled once and read by its G samples).
2. Rewards from a :class:`~fastpeft.training.rewards.MultiObjectiveReward` (built from
   ``config.rewards`` or passed in); a sample whose reward fails is skipped: no advantage, no loss.
   A reward with ``token_advantages`` (:class:`~fastpeft.training.process_supervision.ProcessSupervisionReward`)
   supplies per-token advantages from a process reward model's step scores instead of step 3's.
3. Group advantages (``advantage_scale``: group / batch / none, the batch statistics over every
   rank's rewards); samples cut by the length budget are dropped from the loss with ``mask_truncated``.
4. Old log-probs (only when ``num_iterations`` μ > 1; with μ = 1 the ratio is 1 by construction) and,
   when β > 0, reference log-probs from the same model with adapters disabled (β = 0 skips that
   pass).
5. μ optimizer updates on the batch (micro-batches of ``micro_batch_size`` completions accumulate),
   each minimising :func:`~fastpeft.training.losses_rl.grpo_loss` with the chosen aggregation
   (``grpo``, ``dr_grpo``, ``dapo``); normalisers are global over micro-batches and ranks.

Every log-prob comes from the chunked LM head (:mod:`~fastpeft.training.logprobs`): no pass holds
``[B, C, V]`` logits.

Metrics per step (``metrics.jsonl``): loss, reward mean/std and per-reward means, skipped samples
(``reward_skipped``, cumulative ``reward_skipped_total``), clip fraction, KL, completion length,
truncated share, entropy, grad norm; on ``eval_data`` (greedy) the mean reward and, where records
have an ``"answer"``, exact match, at the start, every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

import fastpeft
from fastpeft.training import distributed as dist_utils
from fastpeft.training.loop import Callback, RecipeRun, RunResult, start_run
from fastpeft.training.losses_rl import group_advantages, grpo_loss
from fastpeft.training.recipe import RunContext, require_reference, setup_run
from fastpeft.training.rewards.multi_objective import MultiObjectiveReward
from fastpeft.training.rl_recipe import (
    RolloutConfig,
    RolloutSetup,
    evaluate_policy,
    gather_rows,
    resolve_reward,
    sample_step,
    setup_rollouts,
)
from fastpeft.training.rollout import CompletionLogprobs, RolloutBatch, batched_logprobs


@dataclasses.dataclass
class GRPOConfig(RolloutConfig):
    """GRPO training (``fastpeft grpo``)."""

    num_generations: int = 8
    advantage_scale: Literal["group", "batch", "none"] = "group"
    loss_aggregation: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.04
    # TRL's conventions, off by default (see losses_rl): sample std, all rows counted, ratio-weighted KL
    advantage_std_correction: int = 0
    count_empty_rows: bool = False
    kl_ratio_correction: bool = False
    num_iterations: int = 1
    output_dir: str = "runs/grpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_generations", "num_iterations"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.advantage_std_correction not in (0, 1):
            raise ValueError(f"advantage_std_correction must be 0 or 1, got {self.advantage_std_correction}")


def rollout_step(
    ctx: RunContext, config: GRPOConfig, batch: RolloutBatch, reward: MultiObjectiveReward
) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Score and compute advantages: ``(batch, advantages [N], loss mask [N, C], stats)`` on the
    run's device. Group statistics are per prompt; ``advantage_scale="batch"`` takes its std over
    every rank's rewards, so N ranks compute what one process would."""
    rewards = reward(batch.prompts, batch.completions, batch.records)
    valid = rewards.valid()
    n = valid.numel()
    every = gather_rows(torch.stack([rewards.tensor().double(), valid.double()], 1), ctx.device)  # [N·ranks, 2]
    adv = group_advantages(
        every[:, 0].float(),
        config.num_generations,
        config.advantage_scale,
        every[:, 1].bool(),
        std_correction=config.advantage_std_correction,
    )
    adv = adv[ctx.rank * n : (ctx.rank + 1) * n] if dist_utils.is_distributed() else adv
    if hasattr(reward, "token_advantages"):  # process supervision: [N, C] advantages from step rewards
        adv = reward.token_advantages(batch, valid, config.num_generations)
    mask = batch.completion_mask * valid[:, None]
    if config.mask_truncated:
        mask = mask * (~batch.truncated)[:, None]
    lengths = batch.completion_mask.sum(1)
    stats = {
        **rewards.summary(),
        "completion_len": float(lengths.mean()),
        "truncated_frac": float(batch.truncated.float().mean()),
    }
    return batch.to(ctx.device), adv.to(ctx.device), mask.to(ctx.device), stats


def policy_update(
    run: RecipeRun,
    config: GRPOConfig,
    batch: RolloutBatch,
    adv: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    norms: tuple[float, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer update's forward and backward on the step's completions, ``micro_batch_size``
    rows at a time (the activations of one micro-batch at a time): ``(this rank's loss, token-weighted
    stats)`` as 0-d tensors, read once per step (no host sync per micro-batch; shapes only, so the
    memory ledger runs it on FakeTensors). ``norms``: the global (all ranks) numbers of sequences and
    of tokens in the loss."""
    num_seqs, num_tokens = norms
    mb = config.micro_batch_size
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.ctx.device)
    stats: dict[str, torch.Tensor] = {}
    chunks = list(range(0, batch.num_sequences, mb))
    for j, i in enumerate(chunks):
        rows = slice(i, i + mb)
        with run.micro_batch(last=j == len(chunks) - 1):
            out = run.runner(**batch.rows(rows))
            logp = out["logp"]
            old = old_logp[rows] if old_logp is not None else logp.detach()
            loss, s = grpo_loss(
                logp,
                old,
                adv[rows],
                mask[rows],
                config.epsilon_low,
                config.epsilon_high,
                config.beta,
                ref_logp[rows] if ref_logp is not None else None,
                config.loss_aggregation,
                config.max_new_tokens,
                num_seqs,
                num_tokens,
                kl_ratio_correction=config.kl_ratio_correction,
            )
            run.backward(loss)
        loss_sum += loss.detach().double()
        tokens = mask[rows].sum()
        s["entropy"] = (out["entropy"].detach() * mask[rows]).sum() / tokens.clamp(min=1)
        for k, v in s.items():  # token-weighted means over the batch
            stats[k] = stats.get(k, 0.0) + v * tokens / max(num_tokens, 1.0)
    return loss_sum, stats


def train(
    config: GRPOConfig,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    reward: MultiObjectiveReward | None = None,
    sampler: Any = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Run GRPO. ``reward`` defaults to ``build_reward(config.rewards)``; ``sampler`` (a
    :class:`~fastpeft.reasoning.types.Generator`) to a :class:`~fastpeft.reasoning.sampler.Sampler`
    on the policy."""
    reward = resolve_reward(config, reward)
    ctx = setup_run(config, model, tokenizer)
    if config.beta > 0:
        require_reference(ctx, f"GRPO with beta={config.beta}")
    setup: RolloutSetup = setup_rollouts(ctx, config, reward, sampler)
    module = CompletionLogprobs(ctx.model, temperature=config.temperature)
    run = start_run(
        ctx,
        config,
        "grpo",
        module,
        config.total_steps(setup.plan.steps_per_epoch),
        setup.layout,
        updates_per_step=config.num_iterations,
        callbacks=callbacks,
        start_record={"prompts": len(setup.records)},
    )
    run.state.setdefault("reward_skipped_total", 0)
    evaluate = (lambda: evaluate_policy(ctx, setup.eval_records, config, setup.reward)) if setup.eval_records else None
    run.evaluate_at_start(evaluate)
    mb = config.micro_batch_size
    for step in run.steps():
        t0 = time.perf_counter()
        batch = sample_step(run, setup, config, step, config.num_generations)
        sample_seconds = time.perf_counter() - t0
        batch, adv, mask, stats = rollout_step(ctx, config, batch, setup.reward)
        run.state["reward_skipped_total"] += int(
            dist_utils.all_reduce_sum(torch.tensor(stats["reward_skipped"], device=ctx.device))
        )
        module.prompt_width = batch.prompt_width
        ref_logp = old_logp = None
        with ctx.autocast():
            if config.beta > 0:
                with fastpeft.disable_adapters(ctx.model):
                    ref_logp = batched_logprobs(module, batch, mb)["logp"]
            if config.num_iterations > 1:
                old_logp = batched_logprobs(module, batch, mb)["logp"]
        counted = torch.ones_like(mask[:, 0], dtype=torch.bool) if config.count_empty_rows else mask.sum(1) > 0
        seq_has = counted.sum().double()
        norms = dist_utils.all_reduce_sum(torch.stack([seq_has, mask.sum().double()]))
        step_stats: dict[str, float] = {}
        for _ in range(config.num_iterations):
            loss_sum, s = policy_update(
                run, config, batch, adv, mask, old_logp, ref_logp, (float(norms[0]), float(norms[1]))
            )
            loss = float(dist_utils.all_reduce_sum(loss_sum))
            run.update(loss)
            for k, v in s.items():
                step_stats[k] = step_stats.get(k, 0.0) + float(v) / config.num_iterations
        run.count_tokens(int(batch.attention_mask.sum()))
        record = {
            "loss": loss,
            **stats,
            **step_stats,
            "reward_skipped_total": run.state["reward_skipped_total"],
            "sample_seconds": sample_seconds,
            "step_seconds": time.perf_counter() - t0,
        }
        run.end_step(step, record, evaluate)
    return run.finish(evaluate)
