"""decode-linear: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with M <= 16 rows (token-by-token generation), forward only.

Memory-bound: the row reports GB/s of the bytes each implementation must move, and the floor is
the HBM time of the NF4 weight alone (NF4 bytes / measured copy bandwidth).
"""

from __future__ import annotations

from .. import formulas
from ..harness import Case
from .linear_common import IMPLS, TOLERANCE, linear_impls

NAME = "decode-linear"
TITLE = "NF4 + LoRA linear, decode (M <= 16), forward, bf16"
IMPL_NAMES = IMPLS
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N)
ROWS = (1, 16)
RANK = 16
SMALL_SHAPES, SMALL_ROWS, SMALL_RANK = ((64, 96), (96, 40)), (1, 5), 4


def cases(small: bool) -> list[Case]:
    shapes, rows, r = (SMALL_SHAPES, SMALL_ROWS, SMALL_RANK) if small else (SHAPES, ROWS, RANK)
    out = []
    for k, n in shapes:
        nf4_bytes = formulas.nf4_weight_bytes(k, n, blocksize=64, double_quant=True)
        for m in rows:
            out.append(
                Case(
                    scenario=NAME,
                    group=f"{k}→{n}",
                    x_name="M",
                    x=m,
                    make_impls=linear_impls(m, k, n, r, train=False),
                    metric="GB/s",
                    flops=formulas.lora_linear_flops(m, k, n, r),
                    bytes=formulas.lora_linear_bytes(m, k, n, r, nf4_bytes),
                    floor=("hbm", nf4_bytes),
                    tolerance=TOLERANCE,
                )
            )
    return out
