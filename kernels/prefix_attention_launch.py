"""What the prefix-attention forward (:mod:`fastpeft.kernels.prefix_attention`) and backward
(:mod:`fastpeft.kernels.prefix_attention_bwd`) kernels share: argument checks, launch tiles, dot
precision, output allocation, prefix strides and the ``tl.dot`` wrapper. Math and layouts are in
:mod:`fastpeft.kernels.prefix_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastpeft.kernels._constants import FLOAT_DTYPES

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = FLOAT_DTYPES


@triton.jit
def attention_dot(a, b, DOT_PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. "upcast" exists only because the Triton interpreter multiplies
    bfloat16 tiles as their raw uint16 bits; on a GPU bf16 goes to the tensor cores unchanged."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def attention_launch_config(head_dim: int, device: torch.device, phase: str) -> LaunchConfig:
    """Block sizes for ``phase`` in {"fwd", "dkdv", "dq"}; a cheap heuristic, not autotuned.

    On CUDA: the largest tiles that compile for sm_90 (triton 3.9) with no register spills
    (checked with ``cuobjdump -res-usage`` on the cubin); not yet timed on a GPU.
    """
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"prefix attention kernel supports head_dim in {SUPPORTED_HEAD_DIMS}, got head_dim={head_dim}")
    if device.type != "cuda":
        # Triton interpreter: the smallest tiles tl.dot accepts keep the numpy work small
        return LaunchConfig(16, 16, 1, 1)
    wide = head_dim > 64
    table = {
        "fwd": LaunchConfig(128, 32, 8, 3) if wide else LaunchConfig(128, 64, 8, 3),
        # dK and dV accumulators are [BLOCK_N, D] fp32 each: narrower key blocks at D=128; 3 stages
        # spill 24 bytes once the pointers are known 16-byte aligned (as in every real launch)
        "dkdv": LaunchConfig(64, 32, 8, 2) if wide else LaunchConfig(32, 128, 8, 3),
        "dq": LaunchConfig(64, 16, 8, 3) if wide else LaunchConfig(128, 32, 8, 3),
    }
    if phase not in table:
        raise ValueError(f"unknown phase {phase!r}; expected 'fwd', 'dkdv' or 'dq'")
    return table[phase]


def attention_dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 inputs get exact fp32 dots (tests compare against float64); 16-bit inputs use tensor cores
    (bf16 in the interpreter is upcast, see :func:`attention_dot`)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and device.type != "cuda" else "tf32"


def empty_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every launcher output comes from here (tests replace it with a NaN-filled allocation)."""
    return torch.empty(shape, dtype=dtype, device=device)


def strides_of_prefix(prefix: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, position, head, dim) strides; batch stride 0 for a shared ``[P, H_kv, D]`` prefix."""
    if prefix.dim() == 3:
        return (0, *prefix.stride())
    return tuple(prefix.stride())  # type: ignore[return-value]


def check_prefix_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    prefix_logit_bias: torch.Tensor | None,
) -> None:
    """Raise a ValueError/TypeError naming the offending shape, dtype or device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D], got {getattr(t, 'shape', type(t))}")
    batch, h_q, t_q, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: expected [{batch}, H_kv, T_k, {head_dim}]"
        )
    h_kv, t_k = k.shape[1], k.shape[2]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key/value heads ({h_kv})")
    if t_q > t_k:
        raise ValueError(f"q has {t_q} positions but k only {t_k}; queries must be the last T_q of the keys")
    if q.dtype not in SUPPORTED_DTYPES and q.dtype != torch.float64:
        raise TypeError(f"q dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"q is {q.dtype} but {name} is {t.dtype}")
        if t is not None and t.device != q.device:
            raise ValueError(f"q is on {q.device} but {name} is on {t.device}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    if prefix_k is not None:
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(f"prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} differ")
        expected = f"[P, {h_kv}, {head_dim}] or [{batch}, P, {h_kv}, {head_dim}]"
        if prefix_k.dim() not in (3, 4) or tuple(prefix_k.shape[-2:]) != (h_kv, head_dim):
            raise ValueError(f"prefix_k must be {expected}, got {tuple(prefix_k.shape)}")
        if prefix_k.dim() == 4 and prefix_k.shape[0] != batch:
            raise ValueError(f"per-sample prefix_k must be {expected}, got {tuple(prefix_k.shape)}")
        if prefix_k.shape[-3] == 0:
            raise ValueError("prefix_k has P=0 positions; pass prefix_k=None for plain causal attention")
    elif prefix_logit_bias is not None:
        raise ValueError("prefix_logit_bias given without a prefix")
    if prefix_logit_bias is not None:
        if prefix_logit_bias.numel() != 1 or not prefix_logit_bias.is_floating_point():
            raise ValueError(
                f"prefix_logit_bias must be a one-element float tensor, got {tuple(prefix_logit_bias.shape)} "
                f"{prefix_logit_bias.dtype}"
            )
        if prefix_logit_bias.device != q.device:
            raise ValueError(f"q is on {q.device} but prefix_logit_bias is on {prefix_logit_bias.device}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, t_k):
            raise ValueError(f"key_padding_mask must be [{batch}, {t_k}], got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"q is on {q.device} but key_padding_mask is on {key_padding_mask.device}")
