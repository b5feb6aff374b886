"""DPO / IPO on preference pairs, with the adapter-disabled model as the reference.

Data: ``{"prompt", "chosen", "rejected"}`` records, tokenized like SFT (completion-only targets,
EOS appended). Per pair the policy's sequence log-probs of both completions (one forward over the
``2B`` rows) and the reference's (same weights, ``fastpeft.disable_adapters``: no second copy)
go into :func:`~fastpeft.training.losses_preference.dpo_loss`. ``loss_type="ipo"`` uses
length-averaged log-probs, as IPO is defined on them.

``sft_coef`` > 0 adds the chosen completion's mean token NLL (RPO, "DPO + NLL")::

    loss_i = dpo_loss_i + sft_coef · (−log π(y_c) / |y_c|)

which keeps DPO from lowering the likelihood of the preferred answers along with the rejected ones
(likelihood displacement: generations can degrade while the implicit reward margin grows).

``precompute_ref=True`` computes every pair's reference log-probs once before training (one
adapter-disabled pass over the data) and reuses them; it also allows ``finetune="full"`` (the
reference is then the initial policy, captured before any update). Resuming recomputes them
(the base weights are frozen, so they come out the same).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import fastpeft
from fastpeft.training import distributed as dist_utils
from fastpeft.training.data import BatchPlan, load_records
from fastpeft.training.losses_preference import dpo_loss
from fastpeft.training.metrics import peak_memory_bytes, progress_bar
from fastpeft.training.rl_common import (Checkpointer, PairRow, RecipeConfig, batch_logprob_sums, build_optimization,
                                         collate_pairs, finish_plot, open_logger, optimizer_step, require_reference,
                                         save_final, setup_run, tokenize_pairs, wrap_ddp)  # fmt: skip


@dataclasses.dataclass
class DPOConfig(RecipeConfig):
    """DPO / IPO training (``fastpeft dpo``)."""

    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    sft_coef: float = 0.0  # RPO: weight of the chosen completions' mean token NLL
    precompute_ref: bool = False
    micro_batch_size: int = 4  # pairs per micro-batch
    grad_accum_steps: int = 1
    num_epochs: float | None = None  # when set, overrides max_steps
    use_chat_template: bool = False
    eval_batch_size: int = 16
    lr: float = 5e-5
    output_dir: str = "runs/dpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sft_coef < 0:
            raise ValueError(f"sft_coef must be >= 0, got {self.sft_coef}")


@dataclasses.dataclass
class DPOResult:
    steps: int
    final_loss: float | None
    eval: dict[str, Any]
    output_dir: Path
    saved: Path | None
    train_seconds: float


class PairLogprobs(nn.Module):
    """``forward(batch) -> [2B]`` sequence log-probs (sum, or mean with ``average``) — one module so
    DDP sees a single forward."""

    def __init__(self, lm: nn.Module, average: bool):
        super().__init__()
        self.lm, self.average = lm, average

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                segment_ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids}
        return batch_logprob_sums(self.lm, batch, self.average)


@torch.no_grad()
def reference_logprobs(module: PairLogprobs, pairs: Sequence[PairRow], pad_id: int, batch_size: int,
                       device: torch.device, disable: bool = True) -> dict[int, tuple[float, float]]:  # fmt: skip
    """pair index -> (ref chosen, ref rejected) log-prob, with adapters disabled (when ``disable``)."""
    out: dict[int, tuple[float, float]] = {}
    ctx = fastpeft.disable_adapters(module.lm) if disable else contextlib.nullcontext()
    with ctx:
        for i in range(0, len(pairs), batch_size):
            chunk = list(pairs[i : i + batch_size])
            lp = module(**collate_pairs(chunk, pad_id, device)).double().cpu()
            for k, p in enumerate(chunk):
                out[p.index] = (float(lp[k]), float(lp[len(chunk) + k]))
    return out


def _pair_terms(module: nn.Module, base: PairLogprobs, pairs: list[PairRow], pad: int, device: torch.device,
                ref_cache: dict[int, tuple[float, float]] | None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    b = collate_pairs(pairs, pad, device)
    lp = module(**b)
    n = len(pairs)
    if ref_cache is not None:
        ref = torch.tensor([ref_cache[p.index] for p in pairs], dtype=torch.float32, device=device)
        ref_c, ref_r = ref[:, 0], ref[:, 1]
    else:
        with torch.no_grad(), fastpeft.disable_adapters(base.lm):
            ref_lp = base(**b)
        ref_c, ref_r = ref_lp[:n], ref_lp[n:]
    return lp[:n], lp[n:], ref_c, ref_r


def chosen_nll(chosen_logps: torch.Tensor, pairs: Sequence[PairRow], averaged: bool) -> torch.Tensor:
    """Mean token NLL of each chosen completion ``[B]`` (``chosen_logps`` are sums unless ``averaged``)."""
    if averaged:
        return -chosen_logps
    counts = [sum(label != -100 for label in p.chosen.labels[1:]) for p in pairs]
    return -chosen_logps / torch.tensor(counts, dtype=chosen_logps.dtype, device=chosen_logps.device).clamp(min=1)


@torch.no_grad()
def evaluate_dpo(module: PairLogprobs, pairs: Sequence[PairRow], pad: int, config: DPOConfig,
                 device: torch.device, ref_cache: dict[int, tuple[float, float]] | None) -> dict[str, float]:  # fmt: skip
    """Mean DPO loss, implicit-reward accuracy and margin on held-out pairs."""
    was = module.training
    module.eval()
    losses, acc, margins = [], [], []
    try:
        for i in range(0, len(pairs), config.eval_batch_size):
            chunk = list(pairs[i : i + config.eval_batch_size])
            terms = _pair_terms(module, module, chunk, pad, device, ref_cache)
            loss, rc, rr = dpo_loss(*terms, config.beta, config.loss_type, config.label_smoothing, "none")
            losses += loss.tolist()
            acc += (rc > rr).float().tolist()
            margins += (rc - rr).tolist()
    finally:
        module.train(was)
    n = max(len(losses), 1)
    return {"eval_loss": sum(losses) / n, "eval_reward_accuracy": sum(acc) / n, "eval_reward_margin": sum(margins) / n}


def train(config: DPOConfig, model: nn.Module | None = None, tokenizer: Any = None,
          callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = ()) -> DPOResult:  # fmt: skip
    """Run DPO as configured; ``model``/``tokenizer`` may be passed in (``config.model`` is then unused)."""
    ctx = setup_run(config, model, tokenizer)
    if not config.precompute_ref:
        require_reference(ctx, "DPO without precompute_ref")
    module = PairLogprobs(ctx.model, average=config.loss_type == "ipo")
    module.train()
    if config.train_data is None:
        raise ValueError("train_data is required (records with prompt, chosen, rejected)")
    pad = ctx.tokenizer.pad_token_id
    pairs = tokenize_pairs(load_records(config.train_data), ctx.tokenizer, config.max_seq_len, config.use_chat_template)
    eval_pairs = []
    if config.eval_data is not None:
        eval_pairs = tokenize_pairs(load_records(config.eval_data), ctx.tokenizer, config.max_seq_len,
                                    config.use_chat_template)  # fmt: skip
    # precomputed reference: before any update (with adapters: disabled; full fine-tuning: the initial policy)
    ref_cache = eval_ref = None
    if config.precompute_ref:
        ref_cache = reference_logprobs(module, pairs, pad, config.eval_batch_size, ctx.device, ctx.has_adapters)
        if eval_pairs:
            eval_ref = reference_logprobs(module, eval_pairs, pad, config.eval_batch_size, ctx.device, ctx.has_adapters)
    plan = BatchPlan(pairs, config.micro_batch_size, config.grad_accum_steps, ctx.world_size, ctx.rank, config.seed)
    total = config.max_steps if config.num_epochs is None else max(1, math.ceil(config.num_epochs * plan.steps_per_epoch))
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimization(config, params, total, ctx.device)
    runner = wrap_ddp(module, ctx)
    checkpointer = Checkpointer(ctx, config, ctx.model)
    state = checkpointer.resume(optimizer, scheduler)
    start, bad = (state["step"], state["bad_steps"]) if state else (0, 0)
    logger = open_logger(ctx, start if state else None)
    logger.log({"event": "start", "recipe": "dpo", "step": start, "total_steps": total, "pairs": len(pairs),
                "trainable_params": sum(p.numel() for p in params), "device": str(ctx.device)})  # fmt: skip
    if eval_pairs and ctx.main and not state:
        logger.log({"step": 0, **evaluate_dpo(module, eval_pairs, pad, config, ctx.device, eval_ref)})
    bar = progress_bar(total, start, ctx.main and config.progress, desc="dpo")
    t0, last_loss = time.perf_counter(), None
    for step in range(start, total):
        micro = plan.micro_batches(step)
        n_pairs = float(dist_utils.all_reduce_sum(torch.tensor(float(sum(len(m) for m in micro)), device=ctx.device)))
        sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, correct, margin, chosen NLL
        for j, mb in enumerate(micro):
            sync = j == len(micro) - 1 or not ctx.distributed
            with runner.no_sync() if not sync else contextlib.nullcontext():
                terms = _pair_terms(runner, module, mb, pad, ctx.device, ref_cache)
                loss, rc, rr = dpo_loss(*terms, config.beta, config.loss_type, config.label_smoothing, "sum")
                nll = chosen_nll(terms[0], mb, averaged=module.average).sum()
                if config.sft_coef:
                    loss = loss + config.sft_coef * nll
                (loss * (ctx.world_size / n_pairs)).backward()
            sums += torch.stack([loss.detach().double(), (rc > rr).sum().double(), (rc - rr).sum().double(),
                                 nll.detach().double()])  # fmt: skip
        sums = dist_utils.all_reduce_sum(sums) / n_pairs
        loss_value = float(sums[0])
        grad_norm, stepped, bad = optimizer_step(params, optimizer, scheduler, loss_value, config.max_grad_norm, bad,
                                                 config.max_bad_steps, step + 1)  # fmt: skip
        last_loss = loss_value if stepped else last_loss
        record = {"step": step + 1, "loss": loss_value if stepped else None, "reward_accuracy": float(sums[1]),
                  "reward_margin": float(sums[2]), "chosen_nll": float(sums[3]), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0]}  # fmt: skip
        if config.eval_every and (step + 1) % config.eval_every == 0 and eval_pairs and ctx.main:
            record.update(evaluate_dpo(module, eval_pairs, pad, config, ctx.device, eval_ref))
        if (step + 1) % config.log_every == 0 or step + 1 == total or "eval_loss" in record:
            logger.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        checkpointer.maybe_save(step + 1, optimizer, scheduler, {"bad_steps": bad})
        for cb in callbacks:
            cb(step + 1, record)
    bar.close()
    seconds = time.perf_counter() - t0
    final = evaluate_dpo(module, eval_pairs, pad, config, ctx.device, eval_ref) if eval_pairs and ctx.main else {}
    saved = save_final(ctx)
    logger.log({"step": total, "event": "end", **final, "train_seconds": seconds,
                "peak_memory_bytes": peak_memory_bytes(ctx.device)})  # fmt: skip
    finish_plot(ctx, config)
    dist_utils.barrier()
    return DPOResult(total, last_loss, final, ctx.out_dir, saved, seconds)
