"""train-linear: forward + backward of y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with M = 8192 rows; grads wrt x, A, B.

W is frozen (no dW). Compute-bound: the row reports TFLOP/s of the whole fwd + bwd
(``formulas.lora_linear_flops(backward=True)``); the floor is the two base GEMMs (x·Wᵀ and dY·W)
at the bf16 GEMM rate measured in the same run.
"""

from __future__ import annotations

from .. import formulas
from ..harness import Case
from .linear_common import IMPLS, TOLERANCE, linear_impls

NAME = "train-linear"
TITLE = "NF4 + LoRA linear, training (M = 8192), forward + backward, bf16"
IMPL_NAMES = IMPLS
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
ROWS = (8192,)
RANK = 16
SMALL_SHAPES, SMALL_ROWS, SMALL_RANK = ((64, 96), (96, 40)), (37,), 4


def cases(small: bool) -> list[Case]:
    shapes, rows, r = (SMALL_SHAPES, SMALL_ROWS, SMALL_RANK) if small else (SHAPES, ROWS, RANK)
    return [
        Case(
            scenario=NAME,
            group=f"{k}→{n}",
            x_name="M",
            x=m,
            make_impls=linear_impls(m, k, n, r, train=True),
            metric="TFLOP/s",
            flops=formulas.lora_linear_flops(m, k, n, r, backward=True),
            floor=("gemm", formulas.base_gemm_flops(m, k, n, backward=True)),
            tolerance=TOLERANCE,
        )
        for k, n in shapes
        for m in rows
    ]
