"""PPO on the GRPO rollout machinery: a value head on the policy's backbone, GAE, clipped losses.

The value head is ``nn.Linear(hidden, 1)`` (fp32, zero-initialised) on the same LoRA backbone as
the policy, so one forward gives the log-probs and the values ``V_t`` of the state before each
completion token. One step:

1. Rollouts (``samples_per_prompt`` per prompt) and sequence rewards, as in GRPO (failed rewards
   skip the sample; ``mask_truncated`` drops truncated completions from the loss).
2. Without grad: old log-probs and values; reference log-probs with adapters disabled.
3. Per-token rewards ``r_t = −kl_coef · (old_logp_t − ref_logp_t)``, plus the sequence reward on
   the last completion token; :func:`~fastpeft.training.losses_rl.gae` (γ, λ); advantages whitened.
4. ``ppo_epochs`` passes over shuffled mini-batches of ``mini_batch_size`` sequences, one optimizer
   update each, on ``ppo_policy_loss + vf_coef · ppo_value_loss``.

Saved: the adapter (PEFT format) with ``value_head.safetensors`` beside it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastpeft
from fastpeft.training import distributed as dist_utils
from fastpeft.training.losses_rl import gae, masked_whiten, ppo_policy_loss, ppo_value_loss
from fastpeft.training.metrics import peak_memory_bytes, progress_bar
from fastpeft.training.rewards.multi_objective import MultiObjectiveReward
from fastpeft.training.rl_common import (Checkpointer, build_optimization, finish_plot, open_logger, optimizer_step,
                                         require_reference, save_final, setup_run, wrap_ddp)  # fmt: skip
from fastpeft.training.rl_recipe import RolloutConfig, evaluate_exact_match, setup_rollouts
from fastpeft.training.rollout import CompletionLogprobs, batched_logprobs, generate_rollouts


@dataclasses.dataclass
class PPOConfig(RolloutConfig):
    """PPO training (``fastpeft ppo``)."""

    samples_per_prompt: int = 2
    ppo_epochs: int = 2
    mini_batch_size: int = 8
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    whiten_advantages: bool = True
    lr: float = 1e-4
    output_dir: str = "runs/ppo"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("samples_per_prompt", "ppo_epochs", "mini_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise ValueError(f"kl_coef and vf_coef must be >= 0, got {self.kl_coef}, {self.vf_coef}")


@dataclasses.dataclass
class PPOResult:
    steps: int
    final_loss: float | None
    eval: dict[str, Any]
    history: list[dict[str, Any]]
    output_dir: Path
    saved: Path | None
    train_seconds: float


def sequence_rewards_to_tokens(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each row's scalar ``scores[i]`` on its last masked-in token: ``[N], [N, C] -> [N, C]``
    (rows with an empty mask get nothing)."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    has = mask.sum(1) > 0
    last = (mask.bool() * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
    rows = torch.nonzero(has).squeeze(1)
    out[rows, last[rows]] = torch.nan_to_num(scores.float(), nan=0.0)[rows]
    return out


def train(config: PPOConfig, model: nn.Module | None = None, tokenizer: Any = None,
          reward: MultiObjectiveReward | None = None, sampler: Any = None,
          callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = ()) -> PPOResult:  # fmt: skip
    """Run PPO (arguments as :func:`fastpeft.training.grpo.train`)."""
    ctx = setup_run(config, model, tokenizer)
    if config.kl_coef > 0:
        require_reference(ctx, f"PPO with kl_coef={config.kl_coef}")
    setup = setup_rollouts(ctx, config, reward, sampler)
    hidden = ctx.model.config.get_text_config().hidden_size
    value_head = nn.Linear(hidden, 1, device=ctx.device, dtype=torch.float32)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    module = CompletionLogprobs(ctx.model, temperature=config.temperature, value_head=value_head)
    runner = wrap_ddp(module, ctx)
    params = [p for p in module.parameters() if p.requires_grad]
    n_seq = config.prompts_per_step * config.samples_per_prompt
    updates_per_step = config.ppo_epochs * math.ceil(n_seq / config.mini_batch_size)
    optimizer, scheduler = build_optimization(config, params, config.max_steps * updates_per_step, ctx.device)
    checkpointer = Checkpointer(ctx, config, module)
    state = checkpointer.resume(optimizer, scheduler)
    start, bad = (state["step"], state["bad_steps"]) if state else (0, 0)
    logger = open_logger(ctx, start if state else None)
    logger.log({"event": "start", "recipe": "ppo", "step": start, "total_steps": config.max_steps,
                "trainable_params": sum(p.numel() for p in params), "device": str(ctx.device)})  # fmt: skip

    history: list[dict[str, Any]] = []
    if not state and setup.eval_records:
        history.append({"step": 0, **evaluate_exact_match(ctx, setup.eval_records, config)})
        logger.log(history[-1])
    bar = progress_bar(config.max_steps, start, ctx.main and config.progress, desc="ppo")
    t0, last_loss = time.perf_counter(), None
    for step in range(start, config.max_steps):
        seed = (config.seed * 1_000_003 + step) * max(ctx.world_size, 1) + ctx.rank
        batch = generate_rollouts(setup.sampler, ctx.tokenizer, setup.plan.micro_batches(step)[0],
                                  config.samples_per_prompt, config.sampling(seed))  # fmt: skip
        rewards = setup.reward(batch.prompts, batch.completions, batch.records)
        mask = batch.completion_mask * rewards.valid()[:, None]
        if config.mask_truncated:
            mask = mask * (~batch.truncated)[:, None]
        batch, mask, scores = batch.to(ctx.device), mask.to(ctx.device), rewards.tensor().to(ctx.device)
        old_logp, old_values = batched_logprobs(module, batch, config.mini_batch_size)
        kl = torch.zeros_like(old_logp)
        if config.kl_coef > 0:
            with fastpeft.disable_adapters(ctx.model):
                ref_logp = batched_logprobs(module, batch, config.mini_batch_size)[0]
            kl = (old_logp - ref_logp) * mask
        token_rewards = sequence_rewards_to_tokens(scores, mask) - config.kl_coef * kl
        advantages, returns = gae(token_rewards, old_values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        gen = torch.Generator().manual_seed(seed)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0}
        n_updates = 0
        for _ in range(config.ppo_epochs):
            order = torch.randperm(batch.num_sequences, generator=gen).to(ctx.device)
            for i in range(0, batch.num_sequences, config.mini_batch_size):
                rows = order[i : i + config.mini_batch_size]
                n_tok = float(dist_utils.all_reduce_sum(mask[rows].sum().double()))
                logp, values = runner(**batch.rows(rows))
                pl, cf = ppo_policy_loss(logp, old_logp[rows], advantages[rows], mask[rows], config.clip_eps, n_tok)
                vl = ppo_value_loss(values, old_values[rows], returns[rows], mask[rows], config.value_clip, n_tok)
                loss = pl + config.vf_coef * vl
                (loss * ctx.world_size).backward()
                loss_value = float(dist_utils.all_reduce_sum(loss.detach().double()))
                grad_norm, stepped, bad = optimizer_step(params, optimizer, scheduler, loss_value, config.max_grad_norm,
                                                         bad, config.max_bad_steps, step + 1)  # fmt: skip
                last_loss = loss_value if stepped else last_loss
                sums["policy_loss"] += float(pl.detach())
                sums["value_loss"] += float(vl.detach())
                sums["clip_fraction"] += cf
                n_updates += 1
        n_valid = max(float(mask.sum()), 1.0)
        record = {"step": step + 1, "loss": last_loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                  **{k: v / n_updates for k, v in sums.items()}, **rewards.summary(),
                  "kl": float(kl.sum()) / n_valid, "completion_len": float(batch.completion_mask.sum(1).mean()),
                  "value_mean": float((old_values * mask).sum()) / n_valid}  # fmt: skip
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.max_steps:
            record.update(evaluate_exact_match(ctx, setup.eval_records, config))
            dist_utils.barrier()
        if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps or "exact_match" in record:
            logger.log(record)
        history.append(record)
        bar.update(1)
        checkpointer.maybe_save(step + 1, optimizer, scheduler, {"bad_steps": bad})
        for cb in callbacks:
            cb(step + 1, record)
    bar.close()
    seconds = time.perf_counter() - t0
    final = evaluate_exact_match(ctx, setup.eval_records, config)
    saved = save_final(ctx, {"weight": value_head.weight, "bias": value_head.bias}, "value_head")
    logger.log({"step": config.max_steps, "event": "end", **final, "train_seconds": seconds,
                "peak_memory_bytes": peak_memory_bytes(ctx.device)})  # fmt: skip
    finish_plot(ctx, config)
    dist_utils.barrier()
    return PPOResult(config.max_steps, last_loss, final, history, ctx.out_dir, saved, seconds)
