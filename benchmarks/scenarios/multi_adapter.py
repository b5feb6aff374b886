"""multi-adapter: a decode batch whose rows use 4 different LoRA adapters vs the same batch on one.

ours: ``fastpeft.kernels.lora_linear_routed`` (per-row adapter ids: the fused NF4 decode kernel with
the adapters stacked along r, W streamed once for all of them); baseline: ``lora_linear`` with a
single adapter on the same rows, which is what the routed batch should cost at most 1.2x of
(issue 17's GPU target, ``../shared/ANCHORS.md``'s "1.2B"/8B decode shapes). bf16, r 16 per adapter.
Rows are checked against float64 with the exact NF4 weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import formulas
from ..harness import BASELINE, OURS, Case, Context, ImplSpec, Prepared
from .linear_common import DTYPE, make_tensors

NAME = "multi-adapter"
TITLE = "decode QLoRA linear, 4 adapters in one batch vs 1 (bf16, r 16 each)"
IMPL_NAMES = ("ours (4 adapters, routed)", "ours (1 adapter)")
SHAPES, ROWS, RANK, ADAPTERS = ((4096, 4096), (4096, 14336)), (4, 16), 16, 4
SMALL_SHAPES, SMALL_ROWS, SMALL_RANK = ((64, 96),), (5,), 4


def _impls(m: int, k: int, n: int, r: int) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        from fastpeft.kernels.backend import backend
        from fastpeft.kernels.lora_linear import lora_linear
        from fastpeft.kernels.lora_linear_routed import lora_linear_routed
        from fastpeft.kernels.nf4 import quantize_nf4
        from fastpeft.kernels.nf4_dequantize import dequantize_nf4_reference

        t = make_tensors(m, k, n, r, ctx.device, train=False)
        q = quantize_nf4(t.w, 64, double_quant=True)
        w64 = dequantize_nf4_reference(q, torch.float32).double()
        gen = torch.Generator().manual_seed(k + n)
        lora_A = [t.lora_A] + [(torch.randn(r, k, generator=gen) / k**0.5).to(ctx.device, DTYPE) for _ in range(3)]
        lora_B = [t.lora_B] + [(torch.randn(n, r, generator=gen) / r**0.5).to(ctx.device, DTYPE) for _ in range(3)]
        scalings = [t.scaling] * ADAPTERS
        ids = (torch.arange(m) % ADAPTERS).to(ctx.device)

        def reference(ids_used: torch.Tensor) -> tuple[torch.Tensor]:
            x = t.x.double()
            y = x @ w64.t()
            for a, (a_, b_, s) in enumerate(zip(lora_A, lora_B, scalings)):
                y = y + (ids_used == a).double()[:, None] * (s * (x @ a_.double().t()) @ b_.double().t())
            return (y,)

        def routed() -> Prepared:
            def run() -> torch.Tensor:
                with torch.no_grad():
                    return lora_linear_routed(t.x, q, None, ids, lora_A, lora_B, scalings)

            return Prepared(run=run, reference=lambda: reference(ids), backend=backend(t.x))

        def single() -> Prepared:
            def run() -> torch.Tensor:
                with torch.no_grad():
                    return lora_linear(t.x, q, None, lora_A[0], lora_B[0], scalings[0])

            return Prepared(run=run, reference=lambda: reference(torch.zeros_like(ids)), backend=backend(t.x))

        return [ImplSpec(IMPL_NAMES[0], OURS, routed), ImplSpec(IMPL_NAMES[1], BASELINE, single)]

    return make


def cases(small: bool) -> list[Case]:
    shapes, rows, r = (SMALL_SHAPES, SMALL_ROWS, SMALL_RANK) if small else (SHAPES, ROWS, RANK)
    out = []
    for k, n in shapes:
        nf4_bytes = formulas.nf4_weight_bytes(k, n, blocksize=64, double_quant=True)
        lora_bytes = formulas.BF16_BYTES * ADAPTERS * r * (k + n)
        for m in rows:
            out.append(
                Case(
                    scenario=NAME,
                    group=f"{k}→{n}, {ADAPTERS} adapters",
                    x_name="M",
                    x=m,
                    make_impls=_impls(m, k, n, r),
                    metric="GB/s",
                    flops=formulas.lora_linear_flops(m, k, n, r),
                    bytes=nf4_bytes + lora_bytes + formulas.BF16_BYTES * m * (k + n),
                    floor=("hbm", nf4_bytes),
                    tolerance=2e-2,
                    target=("time_ratio", 1.2),
                )
            )
    return out
