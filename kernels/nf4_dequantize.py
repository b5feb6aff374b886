"""NF4 dequantization: Triton helpers that dequantize in registers, the dequantize kernel, its torch
reference and the custom ops (the format itself: :mod:`fastpeft.kernels.nf4`).

The fused linear kernels reuse :func:`nf4_unpack_bytes` (aligned tiles: 128-bit loads, both nibbles
of a byte used by the thread that loaded it, the code table in registers) or :func:`nf4_dequant_tile`
(any tile) to dequantize in registers.

Custom ops (``torch.library``; an :class:`~fastpeft.kernels.nf4.NF4Weight` travels as its tensors and
ints, see :meth:`~fastpeft.kernels.nf4.NF4Weight.op_args`): ``fastpeft::dequantize_nf4`` and
``fastpeft::dequantize_nf4_out`` (``triton_op``: the Triton kernel on CUDA, on CPU
:mod:`fastpeft.kernels.nf4_cpu` (bit-identical to the torch reference), the interpreter on CPU with
``TRITON_INTERPRET=1``; see :mod:`fastpeft.kernels.backend`). Neither is differentiable: an NF4
weight is frozen.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from fastpeft.kernels._constants import FLOAT_DTYPES
from fastpeft.kernels.backend import triton_launcher, use_triton
from fastpeft.kernels.nf4 import NESTED_BLOCKSIZE, NF4Weight, nf4_code

# ----------------------------------------------------------------------------------------------
# Triton: dequantize in registers (shared by the fused linear kernels) and to a dense tensor.


@triton.jit
def nf4_block_scale(
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    block_idx,
    mask,
    DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
):
    """fp32 absmax of the blocks ``block_idx`` (any shape), undoing double quantization."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block_idx, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block_idx // NESTED_BLOCK, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * nested + tl.load(offset_ptr)
    else:
        # both branches bind one fp32 name: compiled Triton type-checks every return path
        scale = tl.load(absmax_ptr + block_idx, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def nf4_dequant_tile(
    packed_ptr,
    code_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    flat_idx,
    mask,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
):
    """fp32 values of the weight at flat (row-major) indices ``flat_idx`` (int64, any shape).

    Element by element (a byte load, a table load and a scale per element): the general case, for
    tiles whose rows straddle bytes or blocks. Aligned tiles use :func:`nf4_unpack_bytes`."""
    byte = tl.load(packed_ptr + flat_idx // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where((flat_idx % 2) == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    scale = nf4_block_scale(
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        flat_idx // BLOCKSIZE,
        mask,
        DOUBLE_QUANT,
        NESTED_BLOCK,
    )
    return value * scale


@triton.jit
def nf4_unpack_bytes(code_ptr, byte):
    """fp32 NF4 values ``[R, 2·C]`` (element order: high nibble first) of packed bytes ``[R, C]`` (int32).

    The 16-entry table is loaded once and held in registers; each byte's two codes are looked up in
    it (``tl.gather``: warp shuffles), so a byte is read from memory once, by the thread that uses
    both of its nibbles."""
    rows: tl.constexpr = byte.shape[0] * byte.shape[1] // 32
    # the gather is cheapest (two shuffles per element) on rows of 32 bytes, whatever the caller's tile
    flat = byte.reshape(rows, 32)
    table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (rows, 16))
    values = tl.interleave(tl.gather(table, flat >> 4, 1), tl.gather(table, flat & 0xF, 1))
    return values.reshape(byte.shape[0], 2 * byte.shape[1])


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,
    code_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    out_ptr,
    n,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    # One program: BLOCKS absmax blocks as a [BLOCKS, BLOCKSIZE / 2] tile of bytes (contiguous), so
    # each thread reads 16 bytes with one vector load, one scale per block, and writes whole rows.
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    byte_idx = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < n_bytes, other=0).to(tl.int32)
    scale = nf4_block_scale(
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        block,
        block * BLOCKSIZE < n,
        DOUBLE_QUANT,
        NESTED_BLOCK,
    )
    value = nf4_unpack_bytes(code_ptr, byte) * scale[:, None]  # [BLOCKS, BLOCKSIZE]
    elem = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, value.to(out_ptr.dtype.element_ty), mask=elem < n)


DEQUANT_TILE_BYTES = 2048  # bytes per program: 16 per thread at 4 warps


def kernel_args(q: NF4Weight) -> tuple[Any, ...]:
    """(packed, code, absmax, nested_absmax, nested_code, offset) pointers for the Triton kernels.

    The offset travels as a one-element tensor (no host sync); without double quant the unused
    nested pointers are filled with ``absmax`` so every kernel keeps one signature.
    """
    code = nf4_code(q.device)
    if q.double_quant:
        return q.packed, code, q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1)
    return q.packed, code, q.absmax, q.absmax, q.absmax, q.absmax


def _check_dequant_args(q: NF4Weight, dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.dtype:
    if not isinstance(q, NF4Weight):
        raise TypeError(f"expected an NF4Weight, got {type(q).__name__}")
    dtype = dtype or q.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"NF4 dequantizes to float32/float16/bfloat16, got {dtype}")
    if out is not None and (out.shape != q.shape or out.dtype != dtype or out.device != q.device):
        raise ValueError(
            f"out must be {dtype} of shape {tuple(q.shape)} on {q.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if out is not None and not out.is_contiguous():
        raise ValueError(f"out must be contiguous (written by flat index), got strides {out.stride()}")
    return dtype


def dequantize_nf4_triton(
    q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Launch the Triton dequantization kernel; ``out`` (if given) is reused as the buffer."""
    dtype = _check_dequant_args(q, dtype, out)
    out = torch.empty(q.shape, dtype=dtype, device=q.device) if out is None else out
    packed, code, absmax, nested_absmax, nested_code, offset = kernel_args(q)
    blocks = max(1, DEQUANT_TILE_BYTES // (q.blocksize // 2))
    grid = (triton.cdiv(triton.cdiv(q.numel, q.blocksize), blocks),)
    triton_launcher(_nf4_dequant_kernel)[grid](
        packed,
        code,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        out,
        q.numel,
        q.packed.numel(),
        BLOCKSIZE=q.blocksize,
        DOUBLE_QUANT=q.double_quant,
        NESTED_BLOCK=NESTED_BLOCKSIZE,
        BLOCKS=blocks,
        num_warps=4,
    )
    return out


def dequantize_nf4_reference(
    q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference: ``code[nibble] * absmax[block]`` in fp32, then cast to ``dtype``.

    Bit-identical to bitsandbytes' portable implementation (``backends/default/ops.py``
    ``_dequantize_4bit_compute``). bitsandbytes 0.50.2's public CPU ``dequantize_4bit`` sends even last
    dims to its C kernel, which looks a row's scales up as if each row were whole blocks, so it is
    wrong whenever the last dim is not a multiple of the blocksize (e.g. shape (64, 64) with
    blocksize 128..1024, (4, 96) with 64..256, (33, 80) with 64); there it disagrees with its own
    portable code and with this function (tests/kernels/test_nf4.py). :mod:`fastpeft.kernels.nf4_cpu`
    runs that kernel on one-block rows, where it is right for every shape.
    """
    dtype = _check_dequant_args(q, dtype, out)
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)[: q.numel]
    values = nf4_code(q.device)[codes.long()]
    scale = q.absmax_fp32().repeat_interleave(q.blocksize)[: q.numel]
    result = (values * scale).reshape(q.shape).to(dtype)
    if out is None:
        return result
    return out.copy_(result)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense weight of ``q`` in ``dtype`` (default: the original dtype), shape ``q.shape``.

    Runs the op ``fastpeft::dequantize_nf4`` (or ``fastpeft::dequantize_nf4_out`` into ``out``).
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize_nf4 expects an NF4Weight, got {type(q).__name__}")
    dtype = _check_dequant_args(q, dtype, out)
    if out is None:
        return torch.ops.fastpeft.dequantize_nf4(*q.op_args(), list(q.shape), q.blocksize, dtype)
    torch.ops.fastpeft.dequantize_nf4_out(*q.op_args(), q.blocksize, out)
    return out


def dequantize_into(q: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    """Write the dense weight of ``q`` into ``out`` (``q.shape``, contiguous) with the backend's
    implementation: the body of the dequantization ops, also called inside other ops' bodies."""
    if use_triton(q.packed):
        return dequantize_nf4_triton(q, out.dtype, out)
    if q.device.type == "cpu":  # bit-identical to the reference, 4-100x faster (kernels/nf4_cpu.py)
        from fastpeft.kernels.nf4_cpu import dequantize_nf4_cpu  # imports this module

        return dequantize_nf4_cpu(q, out.dtype, out)
    return dequantize_nf4_reference(q, out.dtype, out)


@torch.library.triton_op("fastpeft::dequantize_nf4", mutates_args=())
def _dequantize_nf4_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    q = NF4Weight.from_op_args(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, dtype)
    return dequantize_into(q, torch.empty(shape, dtype=dtype, device=packed.device))


@_dequantize_nf4_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, dtype):  # type: ignore[no-untyped-def]
    """The dense ``[*shape]`` output; no workspace (the torch path's fp32 temporaries are transient)."""
    return packed.new_empty(shape, dtype=dtype)


@torch.library.triton_op("fastpeft::dequantize_nf4_out", mutates_args={"out"})
def _dequantize_nf4_out_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    out: torch.Tensor,
) -> None:
    q = NF4Weight.from_op_args(packed, absmax, nested_absmax, nested_code, offset, out.shape, blocksize, out.dtype)
    dequantize_into(q, out)


@_dequantize_nf4_out_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, out):  # type: ignore[no-untyped-def]
    """Writes ``out`` only: allocates nothing."""
