"""memory: peak memory of one whole training step, by the memory ledger and (on CUDA) measured.

Rows per case: the ledger (``fastpeft.training.ledger_step``, FakeTensors, device-independent) for
fastpeft's long-context step design, fastpeft's default step (transformers' checkpointing) and
the HF + bitsandbytes + PEFT baseline; on CUDA also our long-context step measured with
``torch.cuda.max_memory_allocated`` (absolute, after warm-up), whose ``extra`` holds the ledger's
peak and their ratio (the "ledger within 10%" check of ``gpu_check.sh``). Ledger rows have no
time: the ledger is not a timing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from .. import bindings
from ..harness import BASELINE, OURS, Case, Context, ImplSpec, Measured
from ..llama_configs import LLAMA_SIZES

NAME = "memory"
TITLE = "whole-step peak memory: memory ledger (fake tensors) for fastpeft and HF + bnb + PEFT; measured on CUDA"
IMPL_NAMES = (
    "ours: ledger, long-context design",
    "ours: ledger, default step",
    "HF + bnb + PEFT: ledger",
    "ours: measured, long-context design",
)
CASES = (("1.2B", 4, 2048), ("8B", 1, 8192))  # (size, batch, seq): the two peak targets
SMALL_CASES = (("tiny", 2, 64),)


def ledger_config(size: str) -> dict:
    return {"model_type": "llama", **{k: v for k, v in LLAMA_SIZES[size].items() if k != "max_position_embeddings"}}


def _ledger_peak(ctx: Context, size: str, batch: int, seq: int, stack: str, design: object) -> object:
    """The ledger of one step, computed once per scenario run (the measured row reuses it)."""
    from fastpeft.training.ledger_step import LedgerSpec, measure_step

    key = ("ledger", size, batch, seq, stack, repr(design))
    if key not in ctx.cache:
        ctx.cache[key] = measure_step(
            LedgerSpec(ledger_config(size), seq_len=seq, batch_size=batch, stack=stack, design=design)
        )
    return ctx.cache[key]


def _ledger(ctx: Context, size: str, batch: int, seq: int, stack: str, design: object) -> Callable[[], Measured]:
    def build() -> Measured:
        start = time.perf_counter()
        result = _ledger_peak(ctx, size, batch, seq, stack, design)
        return Measured(
            median_ms=None,
            peak_mem_bytes=result.peak_bytes,
            extra={
                "mem": "memory ledger (FakeTensor step)",
                "by_category": result.peak_by_category,
                "host_peak_bytes": result.host_peak_bytes,
                "peak_phase": result.peak_phase,
                "ledger_seconds": time.perf_counter() - start,
                "notes": result.notes,
            },
        )

    return build


def _impls(size: str, batch: int, seq: int) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        from fastpeft.training.step_design import StepDesign

        long_context = StepDesign.long_context()
        specs = [
            ImplSpec(IMPL_NAMES[0], OURS, _ledger(ctx, size, batch, seq, "fastpeft", long_context)),
            ImplSpec(IMPL_NAMES[1], OURS, _ledger(ctx, size, batch, seq, "fastpeft", StepDesign())),
            ImplSpec(IMPL_NAMES[2], BASELINE, _ledger(ctx, size, batch, seq, "hf_peft", StepDesign())),
        ]
        if ctx.device.type == "cuda":
            specs.append(ImplSpec(IMPL_NAMES[3], OURS, lambda: _measured(ctx, size, batch, seq, long_context)))
        return specs

    return make


def _measured(ctx: Context, size: str, batch: int, seq: int, design: object) -> Measured:
    """Our step on the GPU (bf16 weights, no autocast: the ledger's step) next to its ledger peak."""
    fields = {k: v for k, v in ledger_config(size).items() if k != "model_type"}
    measured = bindings.qlora_step(
        fields, batch, seq, ctx.device, 1, 2, design=dataclasses.asdict(design), bf16_autocast=False
    )
    ledger = _ledger_peak(ctx, size, batch, seq, "fastpeft", design).peak_bytes
    measured.extra.update(ledger_peak_bytes=ledger, measured_over_ledger=measured.peak_mem_bytes / ledger)
    return measured


def cases(small: bool) -> list[Case]:
    return [
        Case(
            scenario=NAME,
            group=f"{size} bs{batch}",
            x_name="seq",
            x=seq,
            make_impls=_impls(size, batch, seq),
            metric="GiB",
            self_timed=True,
        )
        for size, batch, seq in (SMALL_CASES if small else CASES)
    ]
