"""Causal attention with a learned prefix: every query sees P prefix keys/values non-causally and
the sequence causally, without the prefix ever being expanded to the batch or concatenated to K/V.

Layouts (SDPA's, what transformers passes to an attention function):
    q ``[B, H_q, T_q, D]``, k / v ``[B, H_kv, T_k, D]`` (any strides; H_q a multiple of H_kv),
    prefix_k / prefix_v ``[P, H_kv, D]`` (shared by the batch) or ``[B, P, H_kv, D]`` (per sample),
    key_padding_mask ``[B, T_k]`` bool (True = real token) or None,
    prefix_logit_bias a one-element float tensor (or None) added to every prefix logit,
    output ``[B, H_q, T_q, D]`` (a view of ``[B, T_q, H_q, D]`` memory, so ``o.transpose(1, 2)`` is
    contiguous, which is what transformers wants back), lse ``[B, H_q, T_q]`` fp32 (natural log).

Math, for query i (sequence position i + T_k - T_q, so decoding with T_q < T_k is bottom-right aligned):
    s_ij = scale·q_i·pk_j + bias        for prefix j < P          (always visible)
    s_ij = scale·q_i·k_j                for sequence j ≤ i + T_k - T_q with key_padding_mask[b, j]
    o_i  = Σ_j softmax_j(s_i)·v_j,   lse_i = log Σ_j exp(s_ij)
A bias of log(g) multiplies the prefix's share of the softmax mass by a gate g (see
fastpeft.mixed_prompts); g → 0 is plain causal attention. A row with no visible key gives o_i = 0
and lse_i = +inf (never NaN). Backward (δ_i = Σ_d dO_i·o_i, p_ij = exp(s_ij − lse_i)):
    ds_ij = p_ij·(dO_i·v_j − δ_i);  dq_i = scale·Σ_j ds_ij·k_j;  dk_j = scale·Σ_i ds_ij·q_i;
    dv_j = Σ_i p_ij·dO_i;  dbias = Σ_{i, j<P} ds_ij.  A shared prefix's gradient is summed over B.

This file holds the forward kernel, its launcher and the custom op ``fastpeft::prefix_attention``
(``triton_op``: the kernel on CUDA, the torch reference on CPU; ``register_fake``,
``register_autograd``). The backward kernels and ``fastpeft::prefix_attention_backward`` are in
:mod:`fastpeft.kernels.prefix_attention_bwd`, the torch references of both directions in
:mod:`fastpeft.kernels.prefix_attention_reference`, what the kernels share (checks, tiles) in
:mod:`fastpeft.kernels.prefix_attention_launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels._constants import FLOAT_DTYPES, LN2_JIT, LOG2E, LOG2E_JIT
from fastpeft.kernels.autocast import autocast_off
from fastpeft.kernels.backend import triton_launcher, use_triton
from fastpeft.kernels.prefix_attention_bwd import prefix_attention_backward
from fastpeft.kernels.prefix_attention_launch import (
    attention_dot,
    attention_dot_precision,
    attention_launch_config,
    check_prefix_attention_args,
    empty_output,
    strides_of_prefix,
)
from fastpeft.kernels.prefix_attention_reference import (
    prefix_attention_forward_reference,
    prefix_attention_probs_reference,
)


@triton.jit
def _online_softmax_update(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One step of the streaming softmax; s ``[BM, BN]`` in log2 units with masked entries -inf."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen only masked keys keeps m = -inf; shifting by 0 keeps exp2 finite (no NaN)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + attention_dot(p.to(v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefix_attn_fwd_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    KMASK,
    BIAS,
    O,
    LSE,
    H_q,
    T_q,
    T_k,
    P,
    GROUP,
    CAUSAL_OFFSET,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_pkb,
    stride_pkp,
    stride_pkh,
    stride_pkd,
    stride_pvb,
    stride_pvp,
    stride_pvh,
    stride_pvd,
    stride_mb,
    stride_mt,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    qk_scale,
    HAS_PREFIX: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H_q
    h = pid_bh % H_q
    h_kv = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < T_q

    q_ptrs = Q + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    if HAS_PREFIX:
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(BIAS).to(tl.float32) * LOG2E_JIT
        pk_base = PK + b * stride_pkb + h_kv * stride_pkh
        pv_base = PV + b * stride_pvb + h_kv * stride_pvh
        for start in range(0, P, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < P
            kT = tl.load(
                pk_base + cols[None, :] * stride_pkp + offs_d[:, None] * stride_pkd, mask=col_ok[None, :], other=0.0
            )
            v = tl.load(
                pv_base + cols[:, None] * stride_pvp + offs_d[None, :] * stride_pvd, mask=col_ok[:, None], other=0.0
            )
            s = attention_dot(q, kT, DOT_PRECISION) * qk_scale + bias
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax_update(s, v, m_i, l_i, acc, DOT_PRECISION)

    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    # keys [0, full_hi) are visible to every row of this block: no causal test there
    full_hi = tl.minimum(pid_m * BLOCK_M + CAUSAL_OFFSET + 1, T_k)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    hi = tl.minimum((pid_m + 1) * BLOCK_M + CAUSAL_OFFSET, T_k)
    for start in range(0, full_hi, BLOCK_N):
        cols = start + offs_n
        cols64 = cols.to(tl.int64)
        kT = tl.load(k_base + cols64[None, :] * stride_kt + offs_d[:, None] * stride_kd)
        v = tl.load(v_base + cols64[:, None] * stride_vt + offs_d[None, :] * stride_vd)
        s = attention_dot(q, kT, DOT_PRECISION) * qk_scale
        if HAS_MASK:
            keep = tl.load(KMASK + b * stride_mb + cols64 * stride_mt)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_update(s, v, m_i, l_i, acc, DOT_PRECISION)
    for start in range(full_hi, hi, BLOCK_N):
        cols = start + offs_n
        cols64 = cols.to(tl.int64)
        col_ok = cols < T_k
        kT = tl.load(
            k_base + cols64[None, :] * stride_kt + offs_d[:, None] * stride_kd, mask=col_ok[None, :], other=0.0
        )
        v = tl.load(v_base + cols64[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
        s = attention_dot(q, kT, DOT_PRECISION) * qk_scale
        ok = col_ok[None, :] & (cols[None, :] <= rows[:, None] + CAUSAL_OFFSET)
        if HAS_MASK:
            keep = tl.load(KMASK + b * stride_mb + cols64 * stride_mt, mask=col_ok, other=0)
            ok = ok & (keep[None, :] != 0)
        s = tl.where(ok, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_update(s, v, m_i, l_i, acc, DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2_JIT)
    o_ptrs = O + b * stride_ob + h * stride_oh + rows64[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh * T_q + rows64, lse, mask=row_ok)


def prefix_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    prefix_logit_bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. Returns (o ``[B, H_q, T_q, D]`` view of ``[B, T_q, H_q, D]`` memory, lse
    ``[B, H_q, T_q]`` fp32)."""
    check_prefix_attention_args(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"the prefix attention kernel takes float16, bfloat16 or float32, got q {q.dtype}")
    batch, h_q, t_q, head_dim = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else float(scale)
    cfg = attention_launch_config(head_dim, q.device, "fwd")
    out = empty_output((batch, t_q, h_q, head_dim), q.dtype, q.device).transpose(1, 2)
    lse = empty_output((batch, h_q, t_q), torch.float32, q.device)
    has_prefix = prefix_k is not None
    n_prefix = prefix_k.shape[-3] if has_prefix else 0
    pk_strides = strides_of_prefix(prefix_k) if has_prefix else (0, 0, 0, 0)
    pv_strides = strides_of_prefix(prefix_v) if has_prefix else (0, 0, 0, 0)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    bias = prefix_logit_bias.detach().reshape(1).float() if prefix_logit_bias is not None else None
    grid = lambda META: (triton.cdiv(t_q, META["BLOCK_M"]), batch * h_q)  # noqa: E731
    triton_launcher(_prefix_attn_fwd_kernel)[grid](
        q,
        k,
        v,
        prefix_k if has_prefix else q,
        prefix_v if has_prefix else q,
        mask if mask is not None else q,
        bias if bias is not None else lse,
        out,
        lse,
        h_q,
        t_q,
        t_k,
        n_prefix,
        h_q // h_kv,
        t_k - t_q,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *pk_strides,
        *pv_strides,
        *(mask.stride() if mask is not None else (0, 0)),
        *out.stride(),
        scale * LOG2E,
        HAS_PREFIX=has_prefix,
        HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None,
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION=attention_dot_precision(q.dtype, q.device),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, lse


@torch.library.triton_op("fastpeft::prefix_attention", mutates_args=())
def _prefix_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    prefix_logit_bias: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) as :func:`prefix_attention_forward` returns them, on either backend."""
    if use_triton(q):
        return prefix_attention_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, scale)
    with autocast_off(q.device):
        o, lse = prefix_attention_forward_reference(
            q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, scale
        )
    batch, h_q, t_q, head_dim = q.shape
    out = empty_output((batch, t_q, h_q, head_dim), q.dtype, q.device).transpose(1, 2)  # the kernel's layout
    return out.copy_(o), lse


@_prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, scale):  # type: ignore[no-untyped-def]
    """o (a ``[B, H_q, T_q, D]`` view of ``[B, T_q, H_q, D]`` memory) and lse fp32 ``[B, H_q, T_q]``,
    as both paths allocate them. No workspace; the torch path's transients are the probabilities
    ``[B, H_q, T_q, P + T_k]`` (a few, in q's dtype) and K/V expanded to ``[B, H_q, P + T_k, D]``."""
    batch, h_q, t_q, head_dim = q.shape
    out = q.new_empty((batch, t_q, h_q, head_dim)).transpose(1, 2)
    return out, q.new_empty((batch, h_q, t_q), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):  # type: ignore[no-untyped-def]
    q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, out, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.fastpeft.prefix_attention_backward(
        grad_out,
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        key_padding_mask,
        prefix_logit_bias,
        out,
        lse,
        ctx.scale,
        need_bias_grad=need[6],
        need_dq=need[0],
    )
    dq, dk, dv, dpk, dpv, dbias = (g if n else None for g, n in zip(grads, (*need[:5], need[6])))
    return dq, dk, dv, dpk, dpv, None, dbias, None


_prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    prefix_logit_bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention over ``[prefix ‖ sequence]``; returns o ``[B, H_q, T_q, D]``. Differentiable
    in q, k, v, prefix_k, prefix_v and prefix_logit_bias. Shapes in the module docstring. Runs the op
    ``fastpeft::prefix_attention``."""
    check_prefix_attention_args(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.fastpeft.prefix_attention(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, scale
    )
    return out


__all__ = [
    "check_prefix_attention_args",
    "prefix_attention",
    "prefix_attention_backward",
    "prefix_attention_forward",
    "prefix_attention_forward_reference",
    "prefix_attention_probs_reference",
]
