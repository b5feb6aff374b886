"""lora-step: one whole LoRA training step (forward, backward, AdamW) of a random-weight fp32 Llama.

ours: ``fastpeft.inject`` (LoRA r 16, alpha 32, all 7 projections, dense frozen base; bound in
``bindings.fastpeft_lora_model``); baseline: the same weights wrapped by PEFT
(``baselines.peft_lora_model``). Both models live in the process together and are timed in
interleaved rounds (``harness.interleaved_times``: one step of each per round, the order flipping),
so the row's "vs fastest baseline" is the median over pairs of rounds of (our step time / PEFT's)
(``harness.paired_round_ratios``), which stays steady on a shared CPU where separately timed
medians do not. Rows report tokens/s; TFLOP/s counts
model FLOPs (``formulas.llama_qlora_step_flops``: a frozen dense base costs what a frozen NF4 one
does). No peak memory: the two models are measured at once. No relative-error check: the fused
op is checked against float64 in tests and in ``train-linear``.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable

import torch

from .. import baselines, bindings
from ..harness import BASELINE, OURS, Case, Context, ImplSpec, Measured, interleaved_times, paired_round_ratios
from ..llama_configs import llama_config
from .qlora_step import step_cases

NAME = "lora-step"
TITLE = "whole LoRA training step (fp32 Llama, LoRA r 16 on all 7 projections), interleaved with PEFT"
IMPL_NAMES = ("ours (fastpeft LoRA step)", "HF + PEFT LoRA")
CASES = (("30M", 1, 128), ("30M", 1, 1024))  # (size, batch, seq)
SMALL_CASES = (("tiny", 1, 32),)


def measure_pair(
    size: str, batch: int, seq: int, device: torch.device, warmup: int, rounds: int
) -> dict[str, Measured]:
    """Both implementations' :class:`Measured`, by role, from one interleaved run."""
    transformers = baselines.import_optional("transformers")
    torch.manual_seed(0)
    with torch.device(device):
        base = transformers.LlamaForCausalLM(llama_config(size))  # fp32
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=device)
    steps = {
        OURS: baselines.adapter_train_step(bindings.fastpeft_lora_model(copy.deepcopy(base)), ids),
        BASELINE: baselines.adapter_train_step(baselines.peft_lora_model(base), ids),
    }
    times = interleaved_times(steps, warmup, rounds, device)
    out = {}
    for role, seconds in times.items():
        median_ms = statistics.median(seconds) * 1e3
        out[role] = Measured(
            median_ms=median_ms,
            peak_mem_bytes=None,
            extra={
                "tokens_per_s": batch * seq / (median_ms * 1e-3),
                "tokens_per_step": batch * seq,
                "rounds": rounds,
            },
        )
    ratios = paired_round_ratios(times[OURS], times[BASELINE])
    out[OURS].extra["vs_baseline_interleaved"] = statistics.median(ratios)
    if len(ratios) > 1:  # the spread shows how noisy the machine was
        out[OURS].extra["round_ratio_quartiles"] = statistics.quantiles(ratios, n=4)
    return out


def _impls(size: str, batch: int, seq: int) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        warmup, rounds = (1, 2) if ctx.small else (2, 22)  # rounds in pairs: each order once
        key = f"{NAME} {size} {batch} {seq}"

        def measured(role: str) -> Measured:
            if key not in ctx.cache:  # the first row to run measures both
                ctx.cache[key] = measure_pair(size, batch, seq, ctx.device, warmup, rounds)
            return ctx.cache[key][role]

        return [
            ImplSpec(IMPL_NAMES[0], OURS, lambda: measured(OURS)),
            ImplSpec(IMPL_NAMES[1], BASELINE, lambda: measured(BASELINE)),
        ]

    return make


def cases(small: bool) -> list[Case]:
    return step_cases(NAME, SMALL_CASES if small else CASES, _impls)
