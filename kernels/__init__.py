"""Triton kernels for fastpeft, each with its torch reference, registered as ``torch.library``
custom ops in the namespace ``fastpeft`` (so torch.compile, fake tensors and the profiler see them).

Importing this package compiles nothing and never touches CUDA: kernels are compiled lazily on
first launch. Which implementation runs is decided in one place, :mod:`fastpeft.kernels.backend`.

The functional ops, by module:

- :func:`quantize_nf4`, :func:`dequantize_nf4`, :class:`NF4Weight` (:mod:`~fastpeft.kernels.nf4`);
- :func:`lora_linear`, the fused (Q)LoRA linear (:mod:`~fastpeft.kernels.lora_linear`), and
  :func:`nf4_lora_decode`, its forward-only decode kernel (:mod:`~fastpeft.kernels.nf4_lora_decode`);
- :func:`prefix_attention` (:mod:`~fastpeft.kernels.prefix_attention`);
- :func:`linear_cross_entropy` (:mod:`~fastpeft.kernels.linear_cross_entropy`).
"""

from fastpeft.kernels.backend import backend, force_backend, interpreting
from fastpeft.kernels.linear_cross_entropy import linear_cross_entropy
from fastpeft.kernels.lora_linear import lora_linear
from fastpeft.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from fastpeft.kernels.nf4_lora_decode import nf4_lora_decode
from fastpeft.kernels.prefix_attention import prefix_attention

__all__ = [
    "NF4Weight", "backend", "dequantize_nf4", "force_backend", "interpreting", "linear_cross_entropy",
    "lora_linear", "nf4_lora_decode", "prefix_attention", "quantize_nf4",
]  # fmt: skip
