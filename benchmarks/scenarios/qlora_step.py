"""qlora-step: one whole QLoRA training step (forward, backward, AdamW) of a random-weight Llama.

ours: the SFT recipe's measuring function (bound in ``bindings.QLORA_STEP``); baseline: HF
transformers + bitsandbytes 4-bit + PEFT LoRA (r 16, alpha 32, all 7 projections, gradient
checkpointing, ``model.train()``), PEFT's QLoRA recipe. Rows report tokens/s and peak memory;
TFLOP/s counts model FLOPs (``formulas.llama_qlora_step_flops``); floor = those FLOPs at the
measured bf16 GEMM rate. No relative-error check here: the kernels inside are checked by the
linear and attention scenarios at their real shapes.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import baselines, bindings, formulas
from ..harness import BASELINE, OURS, Case, Context, ImplSpec, Measured
from ..llama_configs import checkpoint_dir, formula_dims, llama_config

NAME = "qlora-step"
TITLE = "whole QLoRA training step (Llama, LoRA r 16 on all 7 projections)"
IMPL_NAMES = ("ours (fastpeft QLoRA step)", "HF + bnb 4-bit + PEFT")
CASES = (("1.2B", 4, 2048), ("8B", 1, 2048), ("8B", 1, 8192))  # (size, batch, seq)
SMALL_CASES = (("tiny", 2, 32),)
RANK = baselines.LORA_RANK


def _impls(size: str, batch: int, seq: int) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        warmup, steps = (1, 1) if ctx.small else (2, 5)  # warm-up steps, then timed ones

        def ours() -> Measured:
            return bindings.qlora_step(llama_config(size), batch, seq, ctx.device, warmup, steps)

        def hf() -> Measured:
            directory = checkpoint_dir(ctx, size)
            return baselines.hf_qlora_step(
                directory, formula_dims(size)["vocab"], batch, seq, ctx.device, warmup, steps
            )

        return [ImplSpec(IMPL_NAMES[0], OURS, ours), ImplSpec(IMPL_NAMES[1], BASELINE, hf)]

    return make


def step_cases(
    scenario: str,
    shapes: tuple[tuple[str, int, int], ...],
    make_impls: Callable[[str, int, int], Callable[[Context], list[ImplSpec]]],
) -> list[Case]:
    """One self-timed case per (Llama size, batch, seq) of an adapter training step (frozen base, LoRA
    r 16 on all 7 projections): model FLOPs, floor = those FLOPs at the GEMM rate; lora-step too."""
    out = []
    for size, batch, seq in shapes:
        flops = formulas.llama_qlora_step_flops(**formula_dims(size), batch=batch, seq=seq, r=RANK)
        out.append(
            Case(
                scenario=scenario,
                group=f"{size} bs{batch}",
                x_name="seq",
                x=seq,
                make_impls=make_impls(size, batch, seq),
                metric="TFLOP/s",
                flops=flops,
                floor=("gemm", flops),
                self_timed=True,
            )
        )
    return out


def cases(small: bool) -> list[Case]:
    return step_cases(NAME, SMALL_CASES if small else CASES, _impls)
