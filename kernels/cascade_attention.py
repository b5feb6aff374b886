"""Shared-prefix (cascade) attention for sampling: a prompt's KV read once for all of its samples.

When N samples continue one prompt, every decode step attends the same prompt keys N times over.
Here the step is split in two and merged exactly:

1. the prompt part, this file's kernel: for prompt p and KV head h, the ``M = n·g`` query rows of
   its n samples and g query heads per KV head attend over the prompt's keys ``[L, D]``, which one
   program streams once for up to ``BLOCK_M`` rows (grid ``(cdiv(M, BLOCK_M), P·H_kv)``);
2. each row's own generated keys (a few, in torch, by the caller);
3. :func:`merge_attention_states`: with ``lse`` the log-sum-exp of each part's scores,
   ``o = (e^{lse₁}·o₁ + e^{lse₂}·o₂) / (e^{lse₁} + e^{lse₂})``, which is the softmax over both parts.

Shapes: q ``[P, H_kv, M, D]``, k / v ``[P, H_kv, L, D]`` (any strides), bias ``[P, L]`` additive
(natural-log units; -inf hides a key: padding, a sliding window), scale a float. Returns o
``[P, H_kv, M, D]`` and lse ``[P, H_kv, M]``, both fp32; a row with no visible key gets o = 0 and
lse = -inf, which the merge weighs as nothing.

Inference only (the sampler decodes under ``torch.inference_mode``): no autograd; the function
refuses inputs that require grad while grad mode is on. The op ``fastpeft::cascade_prefix_attention``
(``triton_op`` with ``register_fake``: traced, and stepped on fake tensors by the memory ledger).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels import prefix_attention_launch
from fastpeft.kernels._constants import FLOAT_DTYPES, LN2_JIT, LOG2E, LOG2E_JIT
from fastpeft.kernels.backend import triton_launcher, use_triton
from fastpeft.kernels.prefix_attention import _online_softmax_update
from fastpeft.kernels.prefix_attention_launch import attention_dot, attention_dot_precision


@triton.jit
def _cascade_prefix_kernel(
    Q,
    K,
    V,
    BIAS,
    O,
    LSE,
    M,
    L,
    H_kv,
    scale_log2,
    stride_qp,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kp,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vp,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_bp,
    stride_bl,
    stride_op,
    stride_oh,
    stride_om,
    stride_od,
    stride_lp,
    stride_lh,
    stride_lm,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_ph = tl.program_id(1).to(tl.int64)
    p = pid_ph // H_kv
    h = pid_ph % H_kv
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = rows < M
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        Q + p * stride_qp + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = K + p * stride_kp + h * stride_kh
    v_base = V + p * stride_vp + h * stride_vh
    for start in range(0, L, BLOCK_N):
        keys = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = keys < L
        k = tl.load(
            k_base + keys[None, :] * stride_kl + offs_d[:, None] * stride_kd,
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        bias = tl.load(BIAS + p * stride_bp + keys * stride_bl, mask=mask_n, other=float("-inf"))
        s = attention_dot(q, k, DOT_PRECISION) * scale_log2 + bias[None, :].to(tl.float32) * LOG2E_JIT
        v = tl.load(
            v_base + keys[:, None] * stride_vl + offs_d[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        m_i, l_i, acc = _online_softmax_update(s, v, m_i, l_i, acc, DOT_PRECISION)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2_JIT)
    tl.store(
        O + p * stride_op + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
        o,
        mask=mask_m[:, None] & mask_d[None, :],
    )
    tl.store(LSE + p * stride_lp + h * stride_lh + rows * stride_lm, lse, mask=mask_m)


def cascade_config(m: int, device: torch.device) -> dict[str, int]:
    """Tiles: all of a group's rows in one program up to 64 (the prompt KV is then read once per
    group); keys in blocks of 32 (16 in the interpreter, to keep its numpy work small). From sm_90
    compiles at D = 128, bf16 (tests/kernels/test_cascade_attention.py): 64 x 32 over 8 warps with
    2 stages takes 178 registers and no spills, where 4 warps spilled 24-280 bytes; not yet timed."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    if device.type != "cuda":
        return {"block_m": block_m, "block_n": 16, "num_warps": 4, "num_stages": 1}
    return {"block_m": block_m, "block_n": 32, "num_warps": 8, "num_stages": 2}


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [P, H_kv, M, D] and k, v [P, H_kv, L, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    p, h, _, d = q.shape
    if k.shape[:2] != (p, h) or k.shape[3] != d:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (P, H_kv and D must match)")
    if bias.shape != (p, k.shape[2]):
        raise ValueError(f"bias must be [P, L] = [{p}, {k.shape[2]}], got {tuple(bias.shape)}")
    if q.dtype != k.dtype or v.dtype != k.dtype or not q.is_floating_point():
        raise TypeError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({t.device for t in (q, k, v, bias)}) != 1:
        raise ValueError(f"q, k, v, bias must be on one device, got {q.device}, {k.device}, {v.device}, {bias.device}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
        raise ValueError("cascade_prefix_attention is inference only (no backward); run it under torch.no_grad()")


def cascade_prefix_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel (arguments already checked); returns (o fp32, lse fp32)."""
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"the cascade attention kernel takes {FLOAT_DTYPES}, got {q.dtype}")
    p, h, m, d = q.shape
    # outputs from the attention kernels' one allocator (tests fill it with NaN: unwritten shows)
    o = prefix_attention_launch.empty_output((p, h, m, d), torch.float32, q.device)
    lse = prefix_attention_launch.empty_output((p, h, m), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    cfg = cascade_config(m, q.device)
    bias = bias.to(torch.float32)
    grid = (triton.cdiv(m, cfg["block_m"]), p * h)
    triton_launcher(_cascade_prefix_kernel)[grid](
        q,
        k,
        v,
        bias,
        o,
        lse,
        m,
        k.shape[2],
        h,
        scale * LOG2E,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *bias.stride(),
        *o.stride(),
        *lse.stride(),
        HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"],
        DOT_PRECISION=attention_dot_precision(q.dtype, q.device),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return o, lse


def cascade_prefix_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference, the CPU path: the kernel's numerics (the two matmuls in the inputs' dtype,
    scores, softmax and outputs in fp32, or float64 for float64 inputs)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale + bias.to(acc)[:, None, None, :]
    lse = torch.logsumexp(s, dim=-1)  # [P, H, M]; -inf for a row with no visible key
    probs = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # all zeros for such a row
    return torch.matmul(probs.to(v.dtype), v).to(acc), lse


def cascade_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt part of a shared-prefix decode step (module docstring): ``(o, lse)``."""
    _check(q, k, v, bias, scale)
    return torch.ops.fastpeft.cascade_prefix_attention(q, k, v, bias, float(scale))


@torch.library.triton_op("fastpeft::cascade_prefix_attention", mutates_args=())
def _cascade_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel where :func:`~fastpeft.kernels.backend.use_triton` says so, else the reference."""
    if use_triton(q):
        return cascade_prefix_attention_triton(q, k, v, bias, scale)
    return cascade_prefix_attention_reference(q, k, v, bias, scale)


@_cascade_op.register_fake
def _(q, k, v, bias, scale):  # type: ignore[no-untyped-def]
    """o ``[P, H, M, D]`` and lse ``[P, H, M]`` in fp32 (float64 for float64 inputs), as both paths make them."""
    acc = torch.promote_types(q.dtype, torch.float32)
    return q.new_empty(q.shape, dtype=acc), q.new_empty(q.shape[:3], dtype=acc)


def merge_attention_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over two disjoint key sets from each one's (o ``[..., D]``, lse ``[...]``)."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isinf(m), 0.0, m)  # both empty: weights 0, output 0
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    total = w1 + w2
    safe = torch.where(total == 0, 1.0, total)
    o = (o1 * w1[..., None] + o2 * w2[..., None]) / safe[..., None]
    return o, m + torch.log(total)
