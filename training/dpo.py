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
adapter-disabled pass over the data, cached by pair: the reference pass then costs nothing per
step) and reuses them; it also allows ``finetune="full"`` (the reference is then the initial
policy, captured before any update). Resuming recomputes them (the base weights are frozen, so
they come out the same).

Sequence log-probs come from the chunked LM head (:func:`~fastpeft.training.logprobs.sequence_logprobs`)
over the target tokens only: no pass holds ``[2B, T, V]`` logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

import fastpeft
from fastpeft.training import distributed as dist_utils
from fastpeft.training.data import BatchPlan, load_records
from fastpeft.training.logprobs import sequence_logprobs
from fastpeft.training.loop import Callback, RecipeRun, RunResult, start_run
from fastpeft.training.losses_preference import dpo_loss
from fastpeft.training.pairs import PairRow, collate_pairs, tokenize_pairs
from fastpeft.training.recipe import RecipeConfig, require_reference, setup_run


@dataclasses.dataclass
class DPOConfig(RecipeConfig):
    """DPO / IPO training (``fastpeft dpo``); ``micro_batch_size`` counts pairs."""

    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    sft_coef: float = 0.0  # RPO: weight of the chosen completions' mean token NLL
    precompute_ref: bool = False
    lr: float = 5e-5
    output_dir: str = "runs/dpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sft_coef < 0:
            raise ValueError(f"sft_coef must be >= 0, got {self.sft_coef}")


class PairLogprobs(nn.Module):
    """``forward(batch) -> [2B]`` sequence log-probs (sum, or mean with ``average``) — one module so
    DDP sees a single forward."""

    def __init__(self, lm: nn.Module, average: bool):
        super().__init__()
        self.lm, self.average = lm, average

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor
    ) -> torch.Tensor:
        return sequence_logprobs(self.lm, input_ids, labels, (segment_ids > 0).long(), position_ids, self.average)


@torch.no_grad()
def reference_logprobs(
    module: PairLogprobs,
    pairs: Sequence[PairRow],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    disable: bool = True,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[int, tuple[float, float]]:
    """pair index -> (ref chosen, ref rejected) log-prob, with adapters disabled (when ``disable``)."""
    out: dict[int, tuple[float, float]] = {}
    ctx = fastpeft.disable_adapters(module.lm) if disable else contextlib.nullcontext()
    with ctx, autocast or contextlib.nullcontext():
        for i in range(0, len(pairs), batch_size):
            chunk = list(pairs[i : i + batch_size])
            lp = module(**collate_pairs(chunk, pad_id, device)).double().cpu()
            for k, p in enumerate(chunk):
                out[p.index] = (float(lp[k]), float(lp[len(chunk) + k]))
    return out


def _pair_terms(
    module: nn.Module,
    base: PairLogprobs,
    pairs: list[PairRow],
    pad: int,
    device: torch.device,
    ref_cache: dict[int, tuple[float, float]] | None,
) -> tuple[torch.Tensor, ...]:
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
def evaluate_dpo(
    module: PairLogprobs,
    pairs: Sequence[PairRow],
    pad: int,
    config: DPOConfig,
    device: torch.device,
    ref_cache: dict[int, tuple[float, float]] | None,
) -> dict[str, float]:
    """Mean DPO loss, implicit-reward accuracy and margin on held-out pairs."""
    was = module.training
    module.eval()
    losses, acc, margins = [], [], []
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
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


def pair_update(
    run: RecipeRun,
    config: DPOConfig,
    module: PairLogprobs,
    micro: Sequence[list[PairRow]],
    pad: int,
    ref_cache: dict[int, tuple[float, float]] | None,
    n_pairs: float,
) -> torch.Tensor:
    """One optimizer update's forward and backward over the micro-batches ``micro`` of pairs (``n_pairs``:
    the global number of pairs of the step): this rank's sums ``[4]`` of the loss, correct
    preferences, reward margins and chosen NLLs (shapes only, so the memory ledger runs it on
    FakeTensors)."""
    device = run.ctx.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for j, mb in enumerate(micro):
        with run.micro_batch(last=j == len(micro) - 1):
            terms = _pair_terms(run.runner, module, mb, pad, device, ref_cache)
            loss, rc, rr = dpo_loss(*terms, config.beta, config.loss_type, config.label_smoothing, "sum")
            nll = chosen_nll(terms[0], mb, averaged=module.average).sum()
            if config.sft_coef:
                loss = loss + config.sft_coef * nll
            run.backward(loss / n_pairs)
        sums += torch.stack(
            [loss.detach().double(), (rc > rr).sum().double(), (rc - rr).sum().double(), nll.detach().double()]
        )
        run.count_tokens(sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in mb))
    return sums


def train(
    config: DPOConfig, model: nn.Module | None = None, tokenizer: Any = None, callbacks: Sequence[Callback] = ()
) -> RunResult:
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
        eval_pairs = tokenize_pairs(
            load_records(config.eval_data), ctx.tokenizer, config.max_seq_len, config.use_chat_template
        )
    # precomputed reference: before any update (with adapters: disabled; full fine-tuning: the initial policy)
    ref_cache = eval_ref = None
    if config.precompute_ref:

        def cache(of: list[PairRow]) -> dict[int, tuple[float, float]]:
            return reference_logprobs(
                module, of, pad, config.eval_batch_size, ctx.device, ctx.has_adapters, ctx.autocast()
            )

        ref_cache = cache(pairs)
        eval_ref = cache(eval_pairs) if eval_pairs else None
    plan = BatchPlan(pairs, config.micro_batch_size, config.grad_accum_steps, ctx.world_size, ctx.rank, config.seed)
    layout = {"pairs": len(pairs), "global_batch_pairs": plan.global_batch}
    run = start_run(
        ctx,
        config,
        "dpo",
        module,
        config.total_steps(plan.steps_per_epoch),
        layout,
        callbacks=callbacks,
        start_record={"pairs": len(pairs)},
    )
    evaluate = (lambda: evaluate_dpo(module, eval_pairs, pad, config, ctx.device, eval_ref)) if eval_pairs else None
    run.evaluate_at_start(evaluate)
    for step in run.steps():
        micro = plan.micro_batches(step)
        n_pairs = float(dist_utils.all_reduce_sum(torch.tensor(float(sum(len(m) for m in micro)), device=ctx.device)))
        sums = dist_utils.all_reduce_sum(pair_update(run, config, module, micro, pad, ref_cache, n_pairs)) / n_pairs
        loss_value = float(sums[0])
        run.update(loss_value)
        run.end_step(
            step,
            {
                "loss": loss_value,
                "reward_accuracy": float(sums[1]),
                "reward_margin": float(sums[2]),
                "chosen_nll": float(sums[3]),
            },
            evaluate,
        )
    return run.finish(evaluate)
