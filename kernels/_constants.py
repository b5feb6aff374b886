"""Constants and dtype sets shared by the kernel files (one definition each).

``@triton.jit`` code may read a module global only when it is a ``tl.constexpr``; the ``*_JIT``
names are the same numbers in that form.
"""

from __future__ import annotations

import torch
import triton.language as tl

# the dtypes every kernel computes in (activations, adapters, dequantized weights)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E), the form the attention kernels use
LN2 = 0.6931471805599453  # ln(2): ln(x) = log2(x) * LN2
LOG2E_JIT = tl.constexpr(LOG2E)
LN2_JIT = tl.constexpr(LN2)
