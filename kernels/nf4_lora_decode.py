"""Decode-regime fused (Q)LoRA linear: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ for M <= 16 rows, one launch.

x ``[M, K]`` (M <= 16), W ``[N, K]`` as :class:`NF4Weight` (or dense), b ``[N]`` or None,
A ``[r, K]``, B ``[N, r]``, y ``[M, N]`` in x's dtype.

At decode sizes the op is bound by reading W, so the kernel streams the 4-bit codes once,
dequantizes them in registers and never writes a dense W. Grid: ``(cdiv(N, BLOCK_N), SPLIT_K)``;
program (n, s) owns output columns ``n·BLOCK_N…`` and the K-slice ``s``. Split-K is what fills an
H100: at N = 4096 and BLOCK_N = 32 there are 128 column tiles, one per SM and too few loads in
flight; at K = 14336 each would also stream a long row alone.

The LoRA term needs x·Aᵀ ``[M, r]`` over the full K, which split-K programs never see. But it is
linear in K: s·(x·Aᵀ)·Bᵀ = Σ_slices s·(x_s·A_sᵀ)·Bᵀ. So each program computes its slice's partial
x·Aᵀ in the same K loop as the W tile (reading A ``[r, slice]``, small and L2-resident: r/BLOCK_N
extra tensor-core work) and adds that partial times its B tile. This keeps the op at one launch
(no pre-pass GEMM, whose launch latency alone is of the order of the whole 4096² NF4 weight
stream: 9.4 MB of NF4 codes and fp32 block scales, 3.1 µs at the 3.02 TB/s an H100 80GB HBM3 copies).

Split-K partials are summed with fp32 atomics into a shared workspace; the last program to finish
a column tile (an arrival counter, acq_rel) adds the bias, casts, writes y and zeroes the
workspace and counter again, so the next call needs no memset. Summation order across splits,
hence the last bits of the result, can differ run to run when SPLIT_K > 1.

Custom op: ``fastpeft::nf4_lora_decode`` (``triton_op``, writes ``out``; forward only, for
inference). On the "torch" backend it runs :func:`nf4_lora_decode_reference`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastpeft.kernels.autocast import autocast_off
from fastpeft.kernels.backend import interpreting, triton_launcher, use_triton
from fastpeft.kernels.lora_linear_inputs import (
    Weight,
    check_lora_linear_args,
    check_scaling,
    weight_from_op_args,
    weight_op_args,
)
from fastpeft.kernels.nf4 import NESTED_BLOCKSIZE, NF4Weight
from fastpeft.kernels.nf4_dequantize import (
    dequantize_nf4_reference,
    kernel_args,
    nf4_block_scale,
    nf4_dequant_tile,
    nf4_unpack_bytes,
)
from fastpeft.kernels.workspace import get_workspace

DECODE_MAX_ROWS = 16  # tl.dot's smallest M tile; more rows go to the training path (dequant + cuBLAS)


@triton.jit
def _lora_decode_kernel(
    # pointers
    x_ptr,
    w_ptr,
    code_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    y_ptr,
    acc_ptr,
    count_ptr,
    row_adapter_ptr,
    adapter_scale_ptr,
    # sizes
    M,
    N,
    K,
    k_bytes,
    R,
    rank_per_adapter,
    k_per_split,
    k_per_split_bytes,
    scaling,
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    # meta-parameters
    IS_NF4: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
    ALIGNED: tl.constexpr,
    ROUTED: tl.constexpr,
    SCALES_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # int64: the flat NF4 index n·K + k passes 2^31 for large layers (e.g. 128256 x 4096), and x
    # may be a strided view (last position of [B, T, H] hidden states: row stride T·H)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x·Wᵀ for this tile and K-slice
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # partial x·Aᵀ over this K-slice
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # byte offsets from their own multiple-of-16 argument: k0 // 2 would only be known 8-aligned,
    # which caps the packed loads at 64 bits
    kb_start = pid_k * k_per_split_bytes
    for step in range(tl.cdiv(k_end - k_start, BLOCK_K)):
        k0 = k_start + step * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_mask = mask_k[:, None] & mask_n[None, :]
        if IS_NF4 and ALIGNED:
            # K % BLOCKSIZE == 0: row n is bytes [n·K/2, (n+1)·K/2) and whole blocks. The tile is
            # read as [BLOCK_N, BLOCK_K/2] bytes, 16 per thread in one vector load, unpacked in
            # registers (both nibbles by the thread that loaded the byte), one scale per block.
            offs_kb = kb_start + step * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            byte = tl.load(
                w_ptr + offs_n[:, None] * k_bytes + offs_kb[None, :],
                mask=mask_n[:, None] & (offs_kb[None, :] < k_end // 2),
                other=0,
            ).to(tl.int32)
            seg_k = k0 + tl.arange(0, SCALES_PER_TILE) * (BLOCK_K // SCALES_PER_TILE)  # first k of each segment
            block_idx = offs_n[:, None] * (K // BLOCKSIZE) + seg_k[None, :] // BLOCKSIZE
            scale = nf4_block_scale(
                absmax_ptr,
                nested_absmax_ptr,
                nested_code_ptr,
                offset_ptr,
                block_idx,
                mask_n[:, None] & (seg_k[None, :] < k_end),
                DOUBLE_QUANT,
                NESTED_BLOCK,
            )
            values = nf4_unpack_bytes(code_ptr, byte).reshape(BLOCK_N, SCALES_PER_TILE, BLOCK_K // SCALES_PER_TILE)
            # masked-off k columns hold code 0 times a real scale: x is 0 there, so they add nothing
            w = tl.trans((values * scale[:, :, None]).reshape(BLOCK_N, BLOCK_K))
        elif IS_NF4:
            # Wᵀ tile [BLOCK_K, BLOCK_N] at flat row-major indices n·K + k: rows may straddle
            # both bytes (odd K) and absmax blocks (K not a multiple of BLOCKSIZE).
            flat = offs_n[None, :] * K + offs_k[:, None]
            w = nf4_dequant_tile(
                w_ptr,
                code_ptr,
                absmax_ptr,
                nested_absmax_ptr,
                nested_code_ptr,
                offset_ptr,
                flat,
                w_mask,
                BLOCKSIZE,
                DOUBLE_QUANT,
                NESTED_BLOCK,
            )
        else:
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
        # round to x's dtype as the dequantize-then-matmul reference does
        w = w.to(x_ptr.dtype.element_ty)
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        if FP32_DOT:
            # fp32 inputs: full fp32 products, not TF32 (torch's default matmul). Also bf16 under
            # the interpreter, whose tl.dot reads bf16 bits as integers; the upcast is exact.
            xf = x.to(tl.float32)
            acc = tl.dot(xf, w.to(tl.float32), acc, input_precision="ieee")
            xa = tl.dot(xf, a.to(tl.float32), xa, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
            xa = tl.dot(x, a, xa)

    # LoRA up-projection of this slice's partial x·Aᵀ; fp32 throughout (it is r-sized, cheap).
    b = tl.load(
        b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    if ROUTED:
        # Several adapters stacked along r (rank_per_adapter rows of A each): row m keeps only the
        # columns of its own adapter (id -1: none), times that adapter's scale. One stream of W
        # serves every adapter of the batch; a row's sums are those of a single-adapter launch.
        ids = tl.load(row_adapter_ptr + offs_m, mask=mask_m, other=-1)
        col_adapter = offs_r // rank_per_adapter
        col_scale = tl.load(adapter_scale_ptr + col_adapter, mask=mask_r, other=0.0)
        xa = tl.where(ids[:, None] == col_adapter[None, :], xa * col_scale[None, :], 0.0)
    else:
        xa = xa * scaling
    acc = tl.dot(xa, b, acc, input_precision="ieee")

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        acc_ptrs = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(acc_ptrs, acc, mask=y_mask, sem="relaxed")
        # Every thread's adds must be ordered before the release of the arrival counter below.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # Last program of this column tile: all partials are in L2; read past L1 (.cg).
            total = tl.load(acc_ptrs, mask=y_mask, other=0.0, cache_modifier=".cg")
            tl.store(acc_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=y_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_config(
    m: int, n: int, k: int, r: int, is_nf4: bool, device: torch.device, aligned: bool = False
) -> dict[str, int]:
    """Heuristic tiles and split for the decode kernel (a GEMV: a cheap rule, no autotuning).

    Aim for ~8 programs per SM so enough loads are in flight to saturate HBM, but keep each K-slice
    at least two BLOCK_K tiles long so the split-K atomics stay a small share of the traffic.
    NF4 with K a multiple of the blocksize (every real layer): 32 x 128 over 4 warps, so each thread
    reads 16 packed bytes with one 128-bit load; 32 x 64 (64-bit loads) once the stacked A is wider
    than 32. Other NF4 shapes go element by element: 32 x 64, 8 warps, unpipelined. Chosen from
    offline sm_90 compiles (Triton 3.9, pointers 16-byte aligned as in a launch; registers, spills and
    load widths in tests/kernels/test_nf4_sass.py, not timings); dense 64 x 64, 8 warps, 3 stages.
    """
    block_r = max(16, triton.next_power_of_2(r))
    if is_nf4 and aligned:  # [32, 64] bytes per K-step over 4 warps: one 16-byte load per thread
        block_n, block_k, num_warps, num_stages = 32, 128, 4, 1
    elif is_nf4:
        block_n, block_k, num_warps, num_stages = 32, 64, 8, 1
    else:
        block_n, block_k, num_warps, num_stages = 64, 64, 8, 3
    if is_nf4 and aligned and block_r > 32:  # wide (or routed, stacked) A: 8-byte loads, no spills
        block_k = 64 if block_r <= 128 else 32
    elif block_r > 64:  # keep the [BLOCK_K, BLOCK_R] tile of A in registers
        block_k = 32 if block_r > 128 else 64
    if device.type == "cuda":
        programs = 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:  # the interpreter: small tiles, and still several K-slices so tests exercise split-K
        block_n, block_k, programs = 32, 32, 8
    n_tiles, k_tiles = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    split_k = max(1, min(programs // n_tiles, k_tiles // 2))
    return {
        "block_n": block_n,
        "block_k": block_k,
        "block_r": block_r,
        "split_k": split_k,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def nf4_lora_decode(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Launch the fused decode kernel: x ``[M <= 16, K]`` -> y ``[M, N]`` (forward only, no autograd).

    ``weight`` is an :class:`NF4Weight` (dequantized in registers) or a dense ``[N, K]`` tensor.
    ``out`` (``[M, N]``, x's dtype) is written in place when given. ``block_n``, ``block_k``,
    ``split_k`` override :func:`decode_config` (benchmark sweeps, tests).
    """
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling)
    out = _decode_output(x, lora_B.shape[0], out)
    _check_tiles(block_n, block_k)
    torch.ops.fastpeft.nf4_lora_decode(
        x,
        *weight_op_args(weight),
        bias,
        lora_A,
        lora_B,
        check_scaling(scaling),
        block_n or 0,
        block_k or 0,
        split_k or 0,
        out,
    )
    return out


def _decode_output(x: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` checked (``[M, N]`` in x's dtype on x's device, M <= 16), or a new one."""
    m = x.shape[0]
    if m > DECODE_MAX_ROWS:
        raise ValueError(f"nf4_lora_decode handles at most {DECODE_MAX_ROWS} rows, got x of shape {tuple(x.shape)}")
    if out is None:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be {x.dtype} [{m}, {n}] on {x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def _check_tiles(block_n: int | None, block_k: int | None) -> None:
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")


@torch.library.triton_op("fastpeft::nf4_lora_decode", mutates_args={"out"})
def _nf4_lora_decode_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    block_n: int,
    block_k: int,
    split_k: int,
    out: torch.Tensor,
) -> None:
    """Writes y into ``out``; W as in :func:`weight_op_args`; tiles and split 0 = :func:`decode_config`."""
    w = weight_from_op_args(
        weight, absmax, nested_absmax, nested_code, offset, blocksize, (lora_B.shape[0], x.shape[1]), x.dtype
    )
    if use_triton(x):
        launch_nf4_lora_decode(
            x,
            w,
            bias,
            lora_A,
            lora_B,
            scaling,
            out=out,
            block_n=block_n or None,
            block_k=block_k or None,
            split_k=split_k or None,
        )
    else:
        with autocast_off(x.device):
            nf4_lora_decode_reference(x, w, bias, lora_A, lora_B, scaling, out=out)


@_nf4_lora_decode_op.register_fake
def _(
    x,
    weight,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    bias,
    lora_A,
    lora_B,
    scaling,
    block_n,
    block_k,
    split_k,
    out,
):  # type: ignore[no-untyped-def]
    """Writes ``out`` only. Workspaces of the Triton path (held across calls): ``"lora_decode_acc"``
    (fp32 ``[16, N]``) and ``"lora_decode_count"`` (int32, one per column tile) when split-K > 1."""


def launch_nf4_lora_decode(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    row_adapters: torch.Tensor | None = None,
    adapter_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`nf4_lora_decode` without the argument checks, for callers that already ran
    :func:`check_lora_linear_args` (saves host time per decode step). ``scaling`` must be a float.

    Routed (several adapters in one batch, :mod:`fastpeft.kernels.lora_linear_routed`): ``lora_A``
    ``[n_adapters·r, K]`` and ``lora_B`` ``[N, n_adapters·r]`` stacked along r, ``row_adapters``
    int32 ``[M]`` (an adapter index, or -1), ``adapter_scales`` fp32 ``[n_adapters]``; ``scaling``
    is then unused."""
    m, k = x.shape
    n, r = lora_B.shape
    out = _decode_output(x, n, out)
    if m == 0:
        return out
    is_nf4 = isinstance(weight, NF4Weight)
    aligned = is_nf4 and k % weight.blocksize == 0
    cfg = decode_config(m, n, k, r, is_nf4, x.device, aligned)
    block_n, block_k = block_n or cfg["block_n"], block_k or cfg["block_k"]
    _check_tiles(block_n, block_k)
    k_tiles = triton.cdiv(k, block_k)
    split_k = min(max(1, split_k or cfg["split_k"]), k_tiles)
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty slices: every program must arrive at the counter
    n_tiles = triton.cdiv(n, block_n)

    if isinstance(weight, NF4Weight):
        w, code, absmax, nested_absmax, nested_code, offset = kernel_args(weight)
        stride_wn, stride_wk, blocksize, double_quant = 0, 0, weight.blocksize, weight.double_quant
    else:
        w = weight
        code = absmax = nested_absmax = nested_code = offset = weight  # unused, one signature
        (stride_wn, stride_wk), blocksize, double_quant = weight.stride(), 64, False
    if split_k > 1:
        acc = get_workspace("lora_decode_acc", DECODE_MAX_ROWS * n, torch.float32, x.device, zeroed=True)
        count = get_workspace("lora_decode_count", n_tiles, torch.int32, x.device, zeroed=True)
    else:
        acc, count = out, out  # unused
    routed = row_adapters is not None
    if routed and (adapter_scales is None or r % adapter_scales.numel()):
        raise ValueError(
            f"routed decode needs adapter_scales with one entry per adapter; lora_B has r={r}, "
            f"got {None if adapter_scales is None else adapter_scales.numel()} scales"
        )
    rank_per_adapter = r // adapter_scales.numel() if routed else r
    grid = (n_tiles, split_k)
    triton_launcher(_lora_decode_kernel)[grid](
        x,
        w,
        code,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        bias if bias is not None else x,
        lora_A,
        lora_B,
        out,
        acc,
        count,
        row_adapters if routed else x,
        adapter_scales if routed else x,
        m,
        n,
        k,
        k // 2,
        r,
        rank_per_adapter,
        k_per_split,
        k_per_split // 2,
        scaling,
        x.stride(0),
        x.stride(1),
        stride_wn,
        stride_wk,
        lora_A.stride(0),
        lora_A.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        out.stride(0),
        out.stride(1),
        IS_NF4=isinstance(weight, NF4Weight),
        BLOCKSIZE=blocksize,
        DOUBLE_QUANT=double_quant,
        NESTED_BLOCK=NESTED_BLOCKSIZE,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        FP32_DOT=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting()),
        ALIGNED=aligned,
        ROUTED=routed,
        SCALES_PER_TILE=max(1, block_k // blocksize),
        BLOCK_M=DECODE_MAX_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_R=cfg["block_r"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def nf4_lora_decode_reference(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`nf4_lora_decode`: W rounded to x's dtype, fp32 math, one final cast."""
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling)
    if isinstance(weight, NF4Weight):
        weight = dequantize_nf4_reference(weight, x.dtype)
    y = x.float() @ weight.float().t() + check_scaling(scaling) * (
        (x.float() @ lora_A.float().t()) @ lora_B.float().t()
    )
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if out is None else out.copy_(y)
