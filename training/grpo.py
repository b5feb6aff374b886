"""GRPO: group-relative policy optimisation on a (Q)LoRA policy with verifiable rewards.

One step (per rank; ranks take different prompts, DDP averages gradients):

1. ``prompts_per_step`` prompts from the training records, ``num_generations`` (G) samples each
   from the batched sampler on the current policy (:mod:`~fastpeft.training.rollout`).
2. Rewards from a :class:`~fastpeft.training.rewards.MultiObjectiveReward` (built from
   ``config.rewards`` or passed in); a sample whose reward fails is skipped: no advantage, no loss.
   A reward with ``token_advantages`` (:class:`~fastpeft.training.process_supervision.ProcessSupervisionReward`)
   supplies per-token advantages from a process reward model's step scores instead of step 3's.
3. Group advantages (``advantage_scale``: group / batch / none); samples cut by the length budget
   are dropped from the loss with ``mask_truncated``.
4. Old log-probs (only when ``num_iterations`` μ > 1; with μ = 1 the ratio is 1 by construction) and,
   when β > 0, reference log-probs from the same model with adapters disabled (β = 0 skips that
   pass).
5. μ optimizer updates on the batch (micro-batches accumulate), each minimising
   :func:`~fastpeft.training.losses_rl.grpo_loss` with the chosen aggregation (``grpo``,
   ``dr_grpo``, ``dapo``); normalisers are global over micro-batches and ranks.

Metrics per step (``metrics.jsonl``): loss, reward mean/std and per-reward means, skipped samples
(``reward_skipped``, cumulative ``reward_skipped_total``), clip fraction, KL, completion length,
truncated share, grad norm; ``exact_match`` on ``eval_data`` (greedy, bundled-task answers) at the
start, every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import fastpeft
from fastpeft.training import distributed as dist_utils
from fastpeft.training.losses_rl import group_advantages, grpo_loss
from fastpeft.training.metrics import peak_memory_bytes, progress_bar
from fastpeft.training.rewards.multi_objective import MultiObjectiveReward
from fastpeft.training.rl_common import (Checkpointer, RunContext, build_optimization, finish_plot, open_logger,
                                         optimizer_step, require_reference, save_final, setup_run, wrap_ddp)  # fmt: skip
from fastpeft.training.rl_recipe import RolloutConfig, evaluate_exact_match, setup_rollouts
from fastpeft.training.rollout import CompletionLogprobs, RolloutBatch, batched_logprobs, generate_rollouts


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
    micro_batch_size: int = 16  # sequences per forward
    eval_at_start: bool = True
    lr: float = 1e-4
    output_dir: str = "runs/grpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_generations", "num_iterations", "micro_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.advantage_std_correction not in (0, 1):
            raise ValueError(f"advantage_std_correction must be 0 or 1, got {self.advantage_std_correction}")


@dataclasses.dataclass
class GRPOResult:
    steps: int
    final_loss: float | None
    eval: dict[str, Any]
    history: list[dict[str, Any]]
    output_dir: Path
    saved: Path | None
    train_seconds: float


def rollout_step(ctx: RunContext, config: GRPOConfig, sampler: Any, reward: MultiObjectiveReward, records: list[dict],
                 seed: int) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor, dict[str, Any]]:  # fmt: skip
    """Sample, score and compute advantages: ``(batch, advantages [N], loss mask [N, C], stats)``."""
    batch = generate_rollouts(sampler, ctx.tokenizer, records, config.num_generations, config.sampling(seed))
    rewards = reward(batch.prompts, batch.completions, batch.records)
    valid = rewards.valid()
    adv = group_advantages(rewards.tensor(), config.num_generations, config.advantage_scale, valid,
                           std_correction=config.advantage_std_correction)  # fmt: skip
    if hasattr(reward, "token_advantages"):  # process supervision: [N, C] advantages from step rewards
        adv = reward.token_advantages(batch, valid, config.num_generations)
    mask = batch.completion_mask * valid[:, None]
    if config.mask_truncated:
        mask = mask * (~batch.truncated)[:, None]
    lengths = batch.completion_mask.sum(1)
    stats = {**rewards.summary(), "completion_len": float(lengths.mean()),
             "truncated_frac": float(batch.truncated.float().mean())}  # fmt: skip
    return batch.to(ctx.device), adv.to(ctx.device), mask.to(ctx.device), stats


def train(config: GRPOConfig, model: nn.Module | None = None, tokenizer: Any = None,
          reward: MultiObjectiveReward | None = None, sampler: Any = None,
          callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = ()) -> GRPOResult:  # fmt: skip
    """Run GRPO. ``reward`` defaults to ``build_reward(config.rewards)``; ``sampler`` (a
    :class:`~fastpeft.reasoning.types.Generator`) to a :class:`~fastpeft.reasoning.sampler.Sampler`
    on the policy."""
    ctx = setup_run(config, model, tokenizer)
    if config.beta > 0:
        require_reference(ctx, f"GRPO with beta={config.beta}")
    setup = setup_rollouts(ctx, config, reward, sampler)
    module = CompletionLogprobs(ctx.model, temperature=config.temperature)
    runner = wrap_ddp(module, ctx)
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    total = config.max_steps
    optimizer, scheduler = build_optimization(config, params, total * config.num_iterations, ctx.device)
    checkpointer = Checkpointer(ctx, config, ctx.model)
    state = checkpointer.resume(optimizer, scheduler)
    start, bad = (state["step"], state["bad_steps"]) if state else (0, 0)
    skipped_total = state.get("reward_skipped_total", 0) if state else 0
    logger = open_logger(ctx, start if state else None)
    logger.log({"event": "start", "recipe": "grpo", "step": start, "total_steps": total, "prompts": len(setup.records),
                "trainable_params": sum(p.numel() for p in params), "device": str(ctx.device)})  # fmt: skip
    history: list[dict[str, Any]] = []
    if config.eval_at_start and not state and setup.eval_records:
        first = {"step": 0, **evaluate_exact_match(ctx, setup.eval_records, config)}
        logger.log(first)
        history.append(first)
    bar = progress_bar(total, start, ctx.main and config.progress, desc="grpo")
    t0, last_loss = time.perf_counter(), None
    mb = config.micro_batch_size
    for step in range(start, total):
        step_t0 = time.perf_counter()
        seed = (config.seed * 1_000_003 + step) * max(ctx.world_size, 1) + ctx.rank
        batch, adv, mask, stats = rollout_step(ctx, config, setup.sampler, setup.reward, setup.plan.micro_batches(step)[0], seed)
        skipped_total += int(dist_utils.all_reduce_sum(torch.tensor(stats["reward_skipped"], device=ctx.device)))
        module.prompt_width = batch.prompt_width
        ref_logp = None
        if config.beta > 0:
            with fastpeft.disable_adapters(ctx.model):
                ref_logp = batched_logprobs(module, batch, mb)
        old_logp = batched_logprobs(module, batch, mb) if config.num_iterations > 1 else None
        counted = torch.ones_like(mask[:, 0], dtype=torch.bool) if config.count_empty_rows else mask.sum(1) > 0
        seq_has = counted.sum().double()
        norms = dist_utils.all_reduce_sum(torch.stack([seq_has, mask.sum().double()]))
        num_seqs, num_tokens = float(norms[0]), float(norms[1])
        step_stats: dict[str, float] = {}
        for _ in range(config.num_iterations):
            loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
            chunks = list(range(0, batch.num_sequences, mb))
            for j, i in enumerate(chunks):
                rows = slice(i, i + mb)
                sync = j == len(chunks) - 1 or not ctx.distributed
                with runner.no_sync() if not sync else contextlib.nullcontext():
                    logp = runner(**batch.rows(rows))
                    old = old_logp[rows] if old_logp is not None else logp.detach()
                    loss, s = grpo_loss(logp, old, adv[rows], mask[rows], config.epsilon_low, config.epsilon_high,
                                        config.beta, ref_logp[rows] if ref_logp is not None else None,
                                        config.loss_aggregation, config.max_new_tokens, num_seqs, num_tokens,
                                        kl_ratio_correction=config.kl_ratio_correction)  # fmt: skip
                    (loss * ctx.world_size).backward()
                loss_sum += loss.detach().double()
                for k, v in s.items():  # token-weighted means over the batch
                    step_stats[k] = step_stats.get(k, 0.0) + v * float(mask[rows].sum()) / max(num_tokens, 1.0)
            loss_value = float(dist_utils.all_reduce_sum(loss_sum))
            grad_norm, stepped, bad = optimizer_step(params, optimizer, scheduler, loss_value, config.max_grad_norm,
                                                     bad, config.max_bad_steps, step + 1)  # fmt: skip
            last_loss = loss_value if stepped else last_loss
        record = {"step": step + 1, "loss": loss_value, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                  **stats, **{k: v / config.num_iterations for k, v in step_stats.items()},
                  "reward_skipped_total": skipped_total, "step_seconds": time.perf_counter() - step_t0}  # fmt: skip
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total:
            record.update(evaluate_exact_match(ctx, setup.eval_records, config))
            dist_utils.barrier()
        if (step + 1) % config.log_every == 0 or step + 1 == total or "exact_match" in record:
            logger.log(record)
        history.append(record)
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward_mean'] or 0:.3f}")
        checkpointer.maybe_save(step + 1, optimizer, scheduler, {"bad_steps": bad, "reward_skipped_total": skipped_total})
        for cb in callbacks:
            cb(step + 1, record)
    bar.close()
    seconds = time.perf_counter() - t0
    final = evaluate_exact_match(ctx, setup.eval_records, config)
    saved = save_final(ctx)
    logger.log({"step": total, "event": "end", **final, "train_seconds": seconds,
                "peak_memory_bytes": peak_memory_bytes(ctx.device)})  # fmt: skip
    finish_plot(ctx, config)
    dist_utils.barrier()
    return GRPOResult(total, last_loss, final, history, ctx.out_dir, saved, seconds)
