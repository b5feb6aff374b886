"""Triton kernels for fastpeft, each with its torch reference, registered as ``torch.library``
custom ops in the namespace ``fastpeft`` (so torch.compile, fake tensors and the profiler see them).

Importing this package compiles nothing and never touches CUDA: kernels are compiled lazily on
first launch. Which implementation runs is decided in one place, :mod:`fastpeft.kernels.backend`.

The functional ops, by module (one operation per file, the file named after it):

- :func:`quantize_nf4`, :class:`NF4Weight` (:mod:`~fastpeft.kernels.nf4`) and :func:`dequantize_nf4`
  (:mod:`~fastpeft.kernels.nf4_dequantize`),
  also exported here;
- ``lora_linear.lora_linear``, the fused (Q)LoRA linear, and ``nf4_lora_decode.nf4_lora_decode``,
  its forward-only decode kernel;
- ``prefix_attention.prefix_attention``;
- ``linear_cross_entropy.linear_cross_entropy``.

These four share their module's name, so here the name is the module (also imported, so that
every op is registered with the package): exporting the function instead would shadow the module
(``import fastpeft.kernels.lora_linear as m`` would bind the function).
"""

from fastpeft.kernels import linear_cross_entropy, lora_linear, nf4_lora_decode, prefix_attention
from fastpeft.kernels.backend import backend, force_backend, interpreting
from fastpeft.kernels.nf4 import NF4Weight, quantize_nf4
from fastpeft.kernels.nf4_dequantize import dequantize_nf4

__all__ = [
    "NF4Weight",
    "backend",
    "dequantize_nf4",
    "force_backend",
    "interpreting",
    "linear_cross_entropy",
    "lora_linear",
    "nf4_lora_decode",
    "prefix_attention",
    "quantize_nf4",
]
