"""Backward of :mod:`fastpeft.kernels.prefix_attention` (math and layouts in that module's docstring).

Three kernels, FlashAttention-2 style (no atomics):
1. ``δ = rowsum(dO ∘ O)`` per query row;
2. dK/dV: one program per (block of keys, b, kv head). Prefix key blocks come first in the grid and
   loop over every query of the kv head's query-head group; sequence key blocks start at the first
   query that can see them. A shared prefix's gradient is written per sample in fp32 and summed
   over the batch afterwards (P·H_kv·D floats per sample, small); the prefix-logit-bias gradient
   is a per-program partial sum, reduced in torch;
3. dQ: one program per (block of queries, b, query head), over the prefix then the causal keys.

:func:`prefix_attention_backward_reference` is the same math in torch (probabilities recomputed
from the saved log-sum-exp), the "torch" backend's path. Custom op:
``fastpeft::prefix_attention_backward`` (``triton_op``), the backward of
``fastpeft::prefix_attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpeft.kernels._constants import LOG2E, LOG2E_JIT
from fastpeft.kernels.autocast import autocast_off
from fastpeft.kernels.backend import triton_launcher, use_triton
from fastpeft.kernels.prefix_attention_launch import (
    attention_dot,
    attention_dot_precision,
    attention_launch_config,
    empty_output,
    strides_of_prefix,
)
from fastpeft.kernels.prefix_attention_reference import prefix_attention_backward_reference


@triton.jit
def _prefix_attn_bwd_delta_kernel(
    O,
    DO,
    DELTA,
    H_q,
    T_q,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_gb,
    stride_gh,
    stride_gt,
    stride_gd,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H_q
    h = pid_bh % H_q
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < T_q
    o = tl.load(
        O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od,
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + offs_d[None, :] * stride_gd,
        mask=row_ok[:, None],
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * T_q + rows, delta, mask=row_ok)


@triton.jit
def _dkdv_over_queries(
    dk,
    dv,
    dbias,
    k,
    v,
    cols,
    key_ok,
    Q,
    DO,
    LSE,
    DELTA,
    b,
    h_kv,
    H_q,
    T_q,
    GROUP,
    start_m,
    CAUSAL_OFFSET,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_gb,
    stride_gh,
    stride_gt,
    stride_gd,
    qk_scale,
    bias2,
    IS_PREFIX: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV ``[BN, D]`` (and Σ dS for the prefix) of one key block over its queries."""
    offs_d = tl.arange(0, HEAD_DIM)
    for g in range(GROUP):
        h = h_kv * GROUP + g
        bh = b * H_q + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_gb + h * stride_gh
        for start in range(start_m, T_q, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            rows64 = rows.to(tl.int64)
            row_ok = rows < T_q
            qT = tl.load(
                q_base + rows64[None, :] * stride_qt + offs_d[:, None] * stride_qd, mask=row_ok[None, :], other=0.0
            )
            do = tl.load(
                do_base + rows64[:, None] * stride_gt + offs_d[None, :] * stride_gd, mask=row_ok[:, None], other=0.0
            )
            # rows past T_q get lse = +inf, hence p = 0
            lse2 = tl.load(LSE + bh * T_q + rows64, mask=row_ok, other=float("inf")) * LOG2E_JIT
            delta = tl.load(DELTA + bh * T_q + rows64, mask=row_ok, other=0.0)
            sT = attention_dot(k, qT, DOT_PRECISION) * qk_scale + bias2  # [BN, BM]
            ok = key_ok[:, None] & row_ok[None, :]
            if not IS_PREFIX:
                ok = ok & (cols[:, None] <= rows[None, :] + CAUSAL_OFFSET)
            pT = tl.where(ok, tl.exp2(sT - lse2[None, :]), 0.0)
            dv += attention_dot(pT.to(do.dtype), do, DOT_PRECISION)
            dpT = attention_dot(v, tl.trans(do), DOT_PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += attention_dot(dsT.to(qT.dtype), tl.trans(qT), DOT_PRECISION)
            if IS_PREFIX:
                dbias += tl.sum(tl.sum(dsT, 1), 0)
    return dk, dv, dbias


@triton.jit
def _prefix_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    KMASK,
    BIAS,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DPK,
    DPV,
    DBIAS_PART,
    H_q,
    H_kv,
    T_q,
    T_k,
    P,
    GROUP,
    CAUSAL_OFFSET,
    N_PREFIX_BLOCKS,
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
    stride_gb,
    stride_gh,
    stride_gt,
    stride_gd,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dvd,
    qk_scale,
    sm_scale,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1).to(tl.int64)
    b = pid_bkv // H_kv
    h_kv = pid_bkv % H_kv
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dbias = tl.zeros([], tl.float32)
    if pid_n < N_PREFIX_BLOCKS:
        cols = pid_n * BLOCK_N + offs_n
        col_ok = cols < P
        pk_base = PK + b * stride_pkb + h_kv * stride_pkh
        pv_base = PV + b * stride_pvb + h_kv * stride_pvh
        k = tl.load(
            pk_base + cols[:, None] * stride_pkp + offs_d[None, :] * stride_pkd, mask=col_ok[:, None], other=0.0
        )
        v = tl.load(
            pv_base + cols[:, None] * stride_pvp + offs_d[None, :] * stride_pvd, mask=col_ok[:, None], other=0.0
        )
        bias2 = 0.0
        if HAS_BIAS:
            bias2 = tl.load(BIAS).to(tl.float32) * LOG2E_JIT
        dk, dv, dbias = _dkdv_over_queries(
            dk,
            dv,
            dbias,
            k,
            v,
            cols,
            col_ok,
            Q,
            DO,
            LSE,
            DELTA,
            b,
            h_kv,
            H_q,
            T_q,
            GROUP,
            0,
            CAUSAL_OFFSET,
            stride_qb,
            stride_qh,
            stride_qt,
            stride_qd,
            stride_gb,
            stride_gh,
            stride_gt,
            stride_gd,
            qk_scale,
            bias2,
            True,
            HEAD_DIM,
            BLOCK_M,
            DOT_PRECISION,
        )
        # fp32 [B, P, H_kv, D], contiguous; summed over B by the launcher for a shared prefix
        dst = (b * P + cols[:, None]) * H_kv * HEAD_DIM + h_kv * HEAD_DIM + offs_d[None, :]
        tl.store(DPK + dst, dk * sm_scale, mask=col_ok[:, None])
        tl.store(DPV + dst, dv, mask=col_ok[:, None])
        if HAS_BIAS:
            tl.store(DBIAS_PART + pid_bkv * N_PREFIX_BLOCKS + pid_n, dbias)
    else:
        n0 = (pid_n - N_PREFIX_BLOCKS) * BLOCK_N
        cols = n0 + offs_n
        cols64 = cols.to(tl.int64)
        col_ok = cols < T_k
        key_ok = col_ok
        if HAS_MASK:
            keep = tl.load(KMASK + b * stride_mb + cols64 * stride_mt, mask=col_ok, other=0)
            key_ok = key_ok & (keep != 0)
        k_ptrs = K + b * stride_kb + h_kv * stride_kh + cols64[:, None] * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = V + b * stride_vb + h_kv * stride_vh + cols64[:, None] * stride_vt + offs_d[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        # the first query that sees key n0 is row n0 - CAUSAL_OFFSET
        start_m = (tl.maximum(n0 - CAUSAL_OFFSET, 0) // BLOCK_M) * BLOCK_M
        dk, dv, dbias = _dkdv_over_queries(
            dk,
            dv,
            dbias,
            k,
            v,
            cols,
            key_ok,
            Q,
            DO,
            LSE,
            DELTA,
            b,
            h_kv,
            H_q,
            T_q,
            GROUP,
            start_m,
            CAUSAL_OFFSET,
            stride_qb,
            stride_qh,
            stride_qt,
            stride_qd,
            stride_gb,
            stride_gh,
            stride_gt,
            stride_gd,
            qk_scale,
            0.0,
            False,
            HEAD_DIM,
            BLOCK_M,
            DOT_PRECISION,
        )
        dk_ptrs = DK + b * stride_dkb + h_kv * stride_dkh + cols64[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
        dv_ptrs = DV + b * stride_dvb + h_kv * stride_dvh + cols64[:, None] * stride_dvt + offs_d[None, :] * stride_dvd
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_step(dq, q, do, lse2, delta, kT, vT, ok, qk_scale, bias2, DOT_PRECISION: tl.constexpr):
    """dq ``[BM, D]`` += dS·K for one key block (kT, vT ``[D, BN]``; ok ``[BM, BN]``)."""
    s = attention_dot(q, kT, DOT_PRECISION) * qk_scale + bias2
    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
    dp = attention_dot(do, vT, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + attention_dot(ds.to(kT.dtype), tl.trans(kT), DOT_PRECISION)


@triton.jit
def _prefix_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    KMASK,
    BIAS,
    DO,
    LSE,
    DELTA,
    DQ,
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
    stride_gb,
    stride_gh,
    stride_gt,
    stride_gd,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dqd,
    qk_scale,
    sm_scale,
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
    row_ok = rows < T_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_gb + h * stride_gh + rows64[:, None] * stride_gt + offs_d[None, :] * stride_gd,
        mask=row_ok[:, None],
        other=0.0,
    )
    lse2 = tl.load(LSE + pid_bh * T_q + rows64, mask=row_ok, other=float("inf")) * LOG2E_JIT
    delta = tl.load(DELTA + pid_bh * T_q + rows64, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_PREFIX:
        bias2 = 0.0
        if HAS_BIAS:
            bias2 = tl.load(BIAS).to(tl.float32) * LOG2E_JIT
        pk_base = PK + b * stride_pkb + h_kv * stride_pkh
        pv_base = PV + b * stride_pvb + h_kv * stride_pvh
        for start in range(0, P, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < P
            kT = tl.load(
                pk_base + cols[None, :] * stride_pkp + offs_d[:, None] * stride_pkd, mask=col_ok[None, :], other=0.0
            )
            vT = tl.load(
                pv_base + cols[None, :] * stride_pvp + offs_d[:, None] * stride_pvd, mask=col_ok[None, :], other=0.0
            )
            dq = _dq_step(dq, q, do, lse2, delta, kT, vT, col_ok[None, :], qk_scale, bias2, DOT_PRECISION)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    hi = tl.minimum((pid_m + 1) * BLOCK_M + CAUSAL_OFFSET, T_k)
    for start in range(0, hi, BLOCK_N):
        cols = start + offs_n
        cols64 = cols.to(tl.int64)
        col_ok = cols < T_k
        kT = tl.load(
            k_base + cols64[None, :] * stride_kt + offs_d[:, None] * stride_kd, mask=col_ok[None, :], other=0.0
        )
        vT = tl.load(
            v_base + cols64[None, :] * stride_vt + offs_d[:, None] * stride_vd, mask=col_ok[None, :], other=0.0
        )
        ok = col_ok[None, :] & (cols[None, :] <= rows[:, None] + CAUSAL_OFFSET)
        if HAS_MASK:
            keep = tl.load(KMASK + b * stride_mb + cols64 * stride_mt, mask=col_ok, other=0)
            ok = ok & (keep[None, :] != 0)
        dq = _dq_step(dq, q, do, lse2, delta, kT, vT, ok, qk_scale, 0.0, DOT_PRECISION)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows64[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def prefix_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    prefix_logit_bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    need_bias_grad: bool = True,
    need_dq: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Triton backward: (dq, dk, dv, dprefix_k, dprefix_v, dbias), shapes as the inputs (None where
    there is no prefix / bias, and dq None when not ``need_dq``: a frozen first layer needs only
    the prefix gradient)."""
    batch, h_q, t_q, head_dim = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group, device = h_q // h_kv, q.device
    qk_scale = scale * LOG2E
    precision = attention_dot_precision(q.dtype, device)
    has_prefix, has_bias = prefix_k is not None, prefix_logit_bias is not None
    n_prefix = prefix_k.shape[-3] if has_prefix else 0
    pk_strides = strides_of_prefix(prefix_k) if has_prefix else (0, 0, 0, 0)
    pv_strides = strides_of_prefix(prefix_v) if has_prefix else (0, 0, 0, 0)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    mask_strides = mask.stride() if mask is not None else (0, 0)
    bias = prefix_logit_bias.detach().reshape(1).float() if has_bias else None

    delta = empty_output((batch, h_q, t_q), torch.float32, device)
    cfg = attention_launch_config(head_dim, device, "dq")
    triton_launcher(_prefix_attn_bwd_delta_kernel)[(triton.cdiv(t_q, cfg.block_m), batch * h_q)](
        out,
        grad_out,
        delta,
        h_q,
        t_q,
        *out.stride(),
        *grad_out.stride(),
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
    )

    dq = None
    if need_dq:
        dq = empty_output((batch, t_q, h_q, head_dim), q.dtype, device).transpose(1, 2)
        triton_launcher(_prefix_attn_bwd_dq_kernel)[(triton.cdiv(t_q, cfg.block_m), batch * h_q)](
            q,
            k,
            v,
            prefix_k if has_prefix else q,
            prefix_v if has_prefix else q,
            mask if mask is not None else q,
            bias if has_bias else delta,
            grad_out,
            lse,
            delta,
            dq,
            h_q,
            t_q,
            t_k,
            n_prefix,
            group,
            t_k - t_q,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *pk_strides,
            *pv_strides,
            *mask_strides,
            *grad_out.stride(),
            *dq.stride(),
            qk_scale,
            scale,
            HAS_PREFIX=has_prefix,
            HAS_MASK=mask is not None,
            HAS_BIAS=has_bias,
            HEAD_DIM=head_dim,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            DOT_PRECISION=precision,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    cfg = attention_launch_config(head_dim, device, "dkdv")
    dk = empty_output((batch, t_k, h_kv, head_dim), k.dtype, device).transpose(1, 2)
    dv = empty_output((batch, t_k, h_kv, head_dim), v.dtype, device).transpose(1, 2)
    n_prefix_blocks = triton.cdiv(n_prefix, cfg.block_n) if has_prefix else 0
    dpk = empty_output((batch, n_prefix, h_kv, head_dim), torch.float32, device) if has_prefix else None
    dpv = empty_output((batch, n_prefix, h_kv, head_dim), torch.float32, device) if has_prefix else None
    dbias_part = empty_output((batch * h_kv, n_prefix_blocks), torch.float32, device) if has_bias else None
    grid = (n_prefix_blocks + triton.cdiv(t_k, cfg.block_n), batch * h_kv)
    triton_launcher(_prefix_attn_bwd_dkdv_kernel)[grid](
        q,
        k,
        v,
        prefix_k if has_prefix else q,
        prefix_v if has_prefix else q,
        mask if mask is not None else q,
        bias if has_bias else delta,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        dpk if has_prefix else delta,
        dpv if has_prefix else delta,
        dbias_part if has_bias else delta,
        h_q,
        h_kv,
        t_q,
        t_k,
        n_prefix,
        group,
        t_k - t_q,
        n_prefix_blocks,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *pk_strides,
        *pv_strides,
        *mask_strides,
        *grad_out.stride(),
        *dk.stride(),
        *dv.stride(),
        qk_scale,
        scale,
        HAS_MASK=mask is not None,
        HAS_BIAS=has_bias,
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )

    dprefix_k = dprefix_v = dbias = None
    if has_prefix:
        if prefix_k.dim() == 3:  # shared prefix: one gradient for the whole batch
            dpk, dpv = dpk.sum(0), dpv.sum(0)
        dprefix_k, dprefix_v = dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
    if has_bias and need_bias_grad:
        dbias = dbias_part.sum().reshape(prefix_logit_bias.shape).to(prefix_logit_bias.dtype)
    return dq, dk, dv, dprefix_k, dprefix_v, dbias


@torch.library.triton_op("fastpeft::prefix_attention_backward", mutates_args=())
def _prefix_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    prefix_logit_bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    need_bias_grad: bool,
    need_dq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v, dbias) on either backend; an empty ``[0]`` tensor for each
    gradient that does not exist (no prefix / bias) or is not needed."""
    if use_triton(q):
        grads = prefix_attention_backward(
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
            scale,
            need_bias_grad,
            need_dq,
        )
    else:
        with autocast_off(q.device):
            grads = prefix_attention_backward_reference(
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
                scale,
                need_bias_grad,
                need_dq,
            )
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@_prefix_attention_backward_op.register_fake
def _(
    grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, out, lse, scale, need_bias_grad, need_dq
):  # type: ignore[no-untyped-def]
    """The gradients in the layouts both paths return (dq, dk, dv as views of ``[B, T, H, D]``
    memory). No workspace; the Triton path's transients are δ (fp32 ``[B, H_q, T_q]``), per-sample
    fp32 prefix gradients ``[B, P, H_kv, D]`` (two) and the bias partial sums."""
    batch, h_q, t_q, head_dim = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    dq = q.new_empty((batch, t_q, h_q, head_dim)).transpose(1, 2) if need_dq else q.new_empty(0)
    dk = k.new_empty((batch, t_k, h_kv, head_dim)).transpose(1, 2)
    dv = v.new_empty((batch, t_k, h_kv, head_dim)).transpose(1, 2)
    dpk = prefix_k.new_empty(prefix_k.shape) if prefix_k is not None else q.new_empty(0)
    dpv = prefix_v.new_empty(prefix_v.shape) if prefix_v is not None else q.new_empty(0)
    has_bias = prefix_logit_bias is not None and need_bias_grad
    dbias = prefix_logit_bias.new_empty(prefix_logit_bias.shape) if has_bias else q.new_empty(0)
    return dq, dk, dv, dpk, dpv, dbias
