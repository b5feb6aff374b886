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
   update each, on ``ppo_policy_loss + vf_coef · ppo_value_loss − entropy_coef · entropy``; each
   mini-batch runs as micro-batches of ``micro_batch_size`` completions. Advantage whitening uses
   every rank's statistics, so N ranks compute what one process would.

Log-probs, entropies and values come from one forward through the chunked LM head
(:mod:`~fastpeft.training.logprobs`): no pass holds ``[B, C, V]`` logits.

Saved: the adapter (PEFT format) with ``value_head.safetensors`` beside it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import fastpeft
from fastpeft.training import distributed as dist_utils
from fastpeft.training.loop import Callback, RecipeRun, RunResult, start_run
from fastpeft.training.losses_rl import gae, ppo_policy_loss, ppo_value_loss
from fastpeft.training.recipe import require_reference, setup_run
from fastpeft.training.rewards.multi_objective import MultiObjectiveReward
from fastpeft.training.rl_recipe import RolloutConfig, evaluate_policy, resolve_reward, sample_step, setup_rollouts
from fastpeft.training.rollout import CompletionLogprobs, RolloutBatch, batched_logprobs


@dataclasses.dataclass
class PPOConfig(RolloutConfig):
    """PPO training (``fastpeft ppo``)."""

    samples_per_prompt: int = 2
    ppo_epochs: int = 2
    mini_batch_size: int = 8  # sequences per optimizer update
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    output_dir: str = "runs/ppo"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("samples_per_prompt", "ppo_epochs", "mini_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kl_coef < 0 or self.vf_coef < 0 or self.entropy_coef < 0:
            raise ValueError(
                f"kl_coef, vf_coef and entropy_coef must be >= 0, got {self.kl_coef}, {self.vf_coef}, "
                f"{self.entropy_coef}"
            )


def sequence_rewards_to_tokens(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each row's scalar ``scores[i]`` on its last masked-in token: ``[N], [N, C] -> [N, C]``
    (rows with an empty mask get nothing)."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    has = mask.sum(1) > 0
    last = (mask.bool() * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
    rows = torch.nonzero(has).squeeze(1)
    out[rows, last[rows]] = torch.nan_to_num(scores.float(), nan=0.0)[rows]
    return out


def whiten_over_ranks(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x − mean) / (std + eps)`` over the masked-in entries of every rank (population std); 0 elsewhere."""
    m = mask.to(torch.float64)
    xd = x.to(torch.float64) * m
    n, total, squares = dist_utils.all_reduce_sum(torch.stack([m.sum(), xd.sum(), (xd * xd).sum()])).tolist()
    n = max(n, 1.0)
    mean = total / n
    std = math.sqrt(max(squares / n - mean * mean, 0.0))
    return ((x - mean) / (std + eps) * mask).to(x.dtype)


def minibatch_update(
    run: RecipeRun,
    config: PPOConfig,
    batch: RolloutBatch,
    rows: torch.Tensor,
    old: dict[str, torch.Tensor],
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[float, dict[str, float]]:
    """One optimizer update on the mini-batch ``rows``, as micro-batches of ``micro_batch_size``
    completions: ``(loss, summed stats)``."""
    n_tok = float(dist_utils.all_reduce_sum(mask[rows].sum().double()))
    loss_sum = torch.zeros((), dtype=torch.float64, device=mask.device)
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
    chunks = list(range(0, len(rows), config.micro_batch_size))
    for j, i in enumerate(chunks):
        r = rows[i : i + config.micro_batch_size]
        with run.micro_batch(last=j == len(chunks) - 1):
            out = run.runner(**batch.rows(r))
            pl, cf = ppo_policy_loss(out["logp"], old["logp"][r], advantages[r], mask[r], config.clip_eps, n_tok)
            vl = ppo_value_loss(out["values"], old["values"][r], returns[r], mask[r], config.value_clip, n_tok)
            entropy = (out["entropy"] * mask[r]).sum() / max(n_tok, 1.0)
            loss = pl + config.vf_coef * vl - config.entropy_coef * entropy
            run.backward(loss)
        loss_sum += loss.detach().double()
        share = float(mask[r].sum()) / max(float(mask[rows].sum()), 1.0)
        sums["policy_loss"] += float(pl.detach())
        sums["value_loss"] += float(vl.detach())
        sums["entropy"] += float(entropy.detach())
        sums["clip_fraction"] += cf * share
    return float(dist_utils.all_reduce_sum(loss_sum)), sums


def train(
    config: PPOConfig,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    reward: MultiObjectiveReward | None = None,
    sampler: Any = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Run PPO (arguments as :func:`fastpeft.training.grpo.train`)."""
    reward = resolve_reward(config, reward)
    ctx = setup_run(config, model, tokenizer)
    if config.kl_coef > 0:
        require_reference(ctx, f"PPO with kl_coef={config.kl_coef}")
    setup = setup_rollouts(ctx, config, reward, sampler)
    hidden = ctx.model.config.get_text_config().hidden_size
    value_head = nn.Linear(hidden, 1, device=ctx.device, dtype=torch.float32)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    module = CompletionLogprobs(ctx.model, temperature=config.temperature, value_head=value_head)
    n_seq = config.prompts_per_step * config.samples_per_prompt
    updates_per_step = config.ppo_epochs * math.ceil(n_seq / config.mini_batch_size)
    run = start_run(
        ctx,
        config,
        "ppo",
        module,
        config.total_steps(setup.plan.steps_per_epoch),
        setup.layout,
        saved_module=module,
        updates_per_step=updates_per_step,
        callbacks=callbacks,
        start_record={"prompts": len(setup.records)},
    )
    evaluate = (lambda: evaluate_policy(ctx, setup.eval_records, config, setup.reward)) if setup.eval_records else None
    run.evaluate_at_start(evaluate)
    mb = config.micro_batch_size
    for step in run.steps():
        batch = sample_step(run, setup, config, step, config.samples_per_prompt)
        rewards = setup.reward(batch.prompts, batch.completions, batch.records)
        mask = batch.completion_mask * rewards.valid()[:, None]
        if config.mask_truncated:
            mask = mask * (~batch.truncated)[:, None]
        batch, mask, scores = batch.to(ctx.device), mask.to(ctx.device), rewards.tensor().to(ctx.device)
        module.prompt_width = batch.prompt_width
        with ctx.autocast():
            old = batched_logprobs(module, batch, mb)
            kl = torch.zeros_like(old["logp"])
            if config.kl_coef > 0:
                with fastpeft.disable_adapters(ctx.model):
                    ref_logp = batched_logprobs(module, batch, mb)["logp"]
                kl = (old["logp"] - ref_logp) * mask
        token_rewards = sequence_rewards_to_tokens(scores, mask) - config.kl_coef * kl
        advantages, returns = gae(token_rewards, old["values"], mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = whiten_over_ranks(advantages, mask)
        gen = torch.Generator().manual_seed((config.seed * 1_000_003 + step) * max(ctx.world_size, 1) + ctx.rank)
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(config.ppo_epochs):
            order = torch.randperm(batch.num_sequences, generator=gen).to(ctx.device)
            for i in range(0, batch.num_sequences, config.mini_batch_size):
                loss, s = minibatch_update(
                    run, config, batch, order[i : i + config.mini_batch_size], old, advantages, returns, mask
                )
                run.update(loss)
                sums = {k: sums.get(k, 0.0) + v for k, v in s.items()}
                n_updates += 1
        n_valid = max(float(mask.sum()), 1.0)
        run.count_tokens(int(batch.attention_mask.sum()))
        record = {
            "loss": run.last_loss,
            **{k: v / n_updates for k, v in sums.items()},
            **rewards.summary(),
            "kl": float(kl.sum()) / n_valid,
            "completion_len": float(batch.completion_mask.sum(1).mean()),
            "value_mean": float((old["values"] * mask).sum()) / n_valid,
        }
        run.end_step(step, record, evaluate)
    return run.finish(evaluate, lambda: {"weight": value_head.weight, "bias": value_head.bias}, "value_head")
