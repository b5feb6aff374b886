"""The inputs of the (Q)LoRA linear ops (the training path in :mod:`fastpeft.kernels.lora_linear`,
the decode kernel in :mod:`fastpeft.kernels.nf4_lora_decode`): their argument checks and the form
in which a base weight W (a dense tensor or an :class:`NF4Weight`) travels through a custom op.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastpeft.kernels._constants import FLOAT_DTYPES
from fastpeft.kernels.nf4 import NF4Weight

Weight = torch.Tensor | NF4Weight
# (weight or packed codes, absmax, nested_absmax, nested_code, offset, blocksize): see weight_op_args
WeightArgs = tuple[
    torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int
]


def weight_op_args(weight: Weight) -> WeightArgs:
    """A base weight as custom-op arguments: a dense W ``[N, K]`` as ``(W, None, None, None, None, 0)``,
    an NF4 weight as its tensors (:meth:`NF4Weight.op_args`) and its blocksize."""
    if isinstance(weight, NF4Weight):
        return (*weight.op_args(), weight.blocksize)
    return weight, None, None, None, None, 0


def weight_from_op_args(
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> Weight:
    """Inverse of :func:`weight_op_args` inside an op; ``shape`` ``(N, K)`` and ``dtype`` (the compute
    dtype) rebuild an NF4 weight, whose original dtype does not matter to the op."""
    if absmax is None:
        return weight
    return NF4Weight.from_op_args(weight, absmax, nested_absmax, nested_code, offset, shape, blocksize, dtype)


def check_scaling(scaling: object) -> float:
    """The LoRA scale as a Python float; a TypeError/ValueError for anything else (no host sync)."""
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a Python number (alpha/r), got {type(scaling).__name__}")
    value = float(scaling)
    if not math.isfinite(value):
        raise ValueError(f"scaling must be finite, got {value}")
    return value


def check_lora_linear_args(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: object = None,
) -> None:
    """Raise a ValueError/TypeError naming the offending shape, dtype or device.

    Expects x ``[M, K]``, weight ``[N, K]`` (dense, same dtype as x, or :class:`NF4Weight`),
    bias ``[N]`` (x's dtype) or None, lora_A ``[r, K]`` and lora_B ``[N, r]`` in x's dtype, r >= 1.
    ``scaling`` is checked too when given.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if not isinstance(weight, (torch.Tensor, NF4Weight)):
        raise TypeError(f"weight must be a torch.Tensor or NF4Weight, got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features but the weight {tuple(weight.shape)} expects {k}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be [r, {k}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"LoRA rank must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must be [{n}, {r}], got {tuple(lora_B.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be a tensor of shape [{n}], got {getattr(bias, 'shape', bias)!r}")
    tensors: dict[str, torch.Tensor | None] = {"lora_A": lora_A, "lora_B": lora_B, "bias": bias}
    if isinstance(weight, torch.Tensor):
        tensors["weight"] = weight
    else:
        tensors["weight.packed"] = weight.packed
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")
    for name in ("lora_A", "lora_B", "bias", "weight"):
        t = tensors.get(name)
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"x is {x.dtype} but {name} is {t.dtype} (cast the layer or the input)")
    if scaling is not None:
        check_scaling(scaling)
