"""NF4 4-bit weights in exactly bitsandbytes' format, and their dequantization.

Format (bitsandbytes ``quantize_4bit(..., quant_type="nf4")``):

- the weight is flattened row-major and cut into blocks of ``blocksize`` consecutive elements
  (a trailing partial block gets its own scale);
- each block is scaled by its fp32 absmax into [-1, 1] and each element rounded to the nearest of
  the 16 NF4 values (``NF4_VALUES``); ties go to the lower code, as ``torch.bucketize`` does;
- two codes per byte, the first element in the high nibble;
- with double quantization the absmax vector is stored as ``absmax - offset`` (offset = its mean)
  quantized blockwise (256 per block) to uint8 with bitsandbytes' signed dynamic 8-bit map, plus
  one fp32 ``nested_absmax`` per 256 blocks. The 8-bit codes reproduce bitsandbytes' CPU library
  (a 65536-point lookup grid, not an exact nearest-code search); bitsandbytes' CUDA kernel searches
  the map directly and can pick the neighbouring code in rare near-midpoint cases.

The Triton kernel below dequantizes into a dense tensor; the fused linear kernels reuse
:func:`nf4_unpack_bytes` (aligned tiles: 128-bit loads, both nibbles of a byte used by the thread
that loaded it, the code table in registers) or :func:`nf4_dequant_tile` (any tile) to dequantize in
registers.

Custom ops (``torch.library``; an :class:`NF4Weight` travels as its tensors and ints, see
:meth:`NF4Weight.op_args`): ``fastpeft::quantize_nf4`` (torch, opaque), ``fastpeft::dequantize_nf4``
and ``fastpeft::dequantize_nf4_out`` (``triton_op``: the Triton kernel on CUDA, on CPU
:mod:`fastpeft.kernels.nf4_cpu` (bit-identical to the torch reference), the interpreter on CPU with
``TRITON_INTERPRET=1``; see :mod:`fastpeft.kernels.backend`). Neither is differentiable: an NF4
weight is frozen.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import triton
import triton.language as tl

from fastpeft.kernels._constants import FLOAT_DTYPES
from fastpeft.kernels.backend import tracing, triton_launcher, use_triton

# The 16 NF4 values (QLoRA, normal-distribution quantiles), fp32, as bitsandbytes stores them.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NESTED_BLOCKSIZE = 256
ALLOWED_BLOCKSIZES = tuple(2**i for i in range(5, 13))  # 32 .. 4096


@functools.cache
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 table as an fp32 tensor ``[16]`` on ``device`` (cached: no copy per call, graph-safe)."""
    if tracing():  # a trace records its own constant; the cache keeps real tensors only
        return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    return _nf4_code_on(torch.device(device))


@functools.cache
def _nf4_code_on(device: torch.device) -> torch.Tensor:
    return _nf4_code_cpu().to(device)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes' signed dynamic 8-bit map (7 exponent bits): a sign, a run of zero bits that
    # sets the decade, then a linear fraction in that decade. The values are built with the same
    # fp32 linspace/means as bitsandbytes so the table matches it bit for bit.
    max_exponent_bits, non_sign_bits = 7, 7
    values: list[float] = []
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit quantization map, fp32 ``[256]``, sorted (a new tensor)."""
    if tracing():
        return torch.tensor(_dynamic_map_cpu().tolist(), dtype=torch.float32, device=device)
    return _dynamic_map_cpu().to(device, copy=True)


@dataclasses.dataclass
class NF4Weight:
    """A 4-bit NF4 weight: the same bytes and statistics as a bitsandbytes ``QuantState``.

    Attributes:
        packed: uint8 ``[ceil(numel / 2)]``, two codes per byte, first element in the high nibble.
        absmax: fp32 ``[n_blocks]``; with double quant uint8 ``[n_blocks]`` (codes of absmax - offset).
        shape: the dense weight's shape, e.g. ``(out_features, in_features)``.
        blocksize: elements per absmax block.
        dtype: dtype of the dense weight (the default dequantization dtype).
        nested_absmax: fp32 ``[ceil(n_blocks / 256)]`` with double quant, else None.
        nested_code: fp32 ``[256]`` dynamic map with double quant, else None.
        offset: fp32 scalar tensor (mean of the absmax) with double quant, else None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    blocksize: int
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        _check_blocksize(self.blocksize)
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"NF4Weight.dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        n = self.shape.numel()
        if n == 0:
            raise ValueError(f"NF4Weight needs a non-empty shape, got {tuple(self.shape)}")
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"NF4Weight.packed must be uint8 with {(n + 1) // 2} bytes for shape {tuple(self.shape)}, "
                f"got {self.packed.dtype} with {self.packed.numel()}"
            )
        n_blocks = -(-n // self.blocksize)
        if self.absmax.numel() != n_blocks:
            raise ValueError(
                f"NF4Weight.absmax must have {n_blocks} entries for shape {tuple(self.shape)} and blocksize "
                f"{self.blocksize}, got {self.absmax.numel()}"
            )
        nested = (self.nested_absmax, self.nested_code, self.offset)
        if any(t is not None for t in nested) and any(t is None for t in nested):
            raise ValueError("double quantization needs nested_absmax, nested_code and offset together")
        if self.double_quant:
            self._check_nested(n_blocks)
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"NF4Weight.absmax must be float32, got {self.absmax.dtype}")
        devices = {t.device for t in self.tensors().values()}
        if len(devices) != 1:
            raise ValueError(f"NF4Weight tensors must share one device, got {sorted(map(str, devices))}")
        self.packed = self.packed.reshape(-1)
        self.absmax = self.absmax.reshape(-1)

    def _check_nested(self, n_blocks: int) -> None:
        if self.absmax.dtype != torch.uint8:
            raise ValueError(f"double-quantized NF4Weight.absmax must be uint8, got {self.absmax.dtype}")
        n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
        checks = (
            ("nested_absmax", self.nested_absmax, n_nested),
            ("nested_code", self.nested_code, 256),
            ("offset", self.offset, 1),
        )
        for name, t, numel in checks:
            if t.dtype != torch.float32 or t.numel() != numel:
                raise ValueError(
                    f"NF4Weight.{name} must be float32 with {numel} entries, got {t.dtype} with {t.numel()}"
                )

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (packed codes plus statistics)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store (state_dict buffers), by name."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out.update(nested_absmax=self.nested_absmax, nested_code=self.nested_code, offset=self.offset)
        return out

    def op_args(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(packed, absmax, nested_absmax, nested_code, offset): how the ``fastpeft::`` ops take this
        weight (custom ops take tensors and ints, not dataclasses); None without double quant."""
        return self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset

    @classmethod
    def from_op_args(
        cls,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        nested_absmax: torch.Tensor | None,
        nested_code: torch.Tensor | None,
        offset: torch.Tensor | None,
        shape: Any,
        blocksize: int,
        dtype: torch.dtype,
    ) -> NF4Weight:
        """The inverse of :meth:`op_args` (inside an op: the same tensors, no copy)."""
        return cls(
            packed=packed,
            absmax=absmax,
            shape=shape,
            blocksize=blocksize,
            dtype=dtype,
            nested_absmax=nested_absmax,
            nested_code=nested_code,
            offset=offset,
        )

    def to(self, device: torch.device | str) -> NF4Weight:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return NF4Weight(shape=self.shape, blocksize=self.blocksize, dtype=self.dtype, **moved)

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block scales as fp32 ``[n_blocks]`` (undoing double quantization if used)."""
        if not self.double_quant:
            return self.absmax
        # Same op order as bitsandbytes: code[q] * nested_absmax[block], then + offset, in fp32.
        idx = torch.arange(self.absmax.numel(), device=self.device) // NESTED_BLOCKSIZE
        return self.nested_code[self.absmax.long()] * self.nested_absmax[idx] + self.offset

    @classmethod
    def from_bnb(cls, weight: Any, quant_state: Any = None) -> NF4Weight:
        """Wrap a bitsandbytes ``Params4bit`` (or packed tensor + ``QuantState``) without re-quantizing.

        The returned tensors are views of bitsandbytes' (packed codes reshaped to ``[n / 2]``, any
        ``quant_storage`` dtype reinterpreted as uint8). A weight that bitsandbytes repacked for its
        own CPU kernel (``quant_state.packing_format_for_cpu``: other byte order, bf16 absmax) is
        refused; restore it with bitsandbytes' ``_convert_weight_packed_for_cpu_inverse`` first.
        """
        state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError("NF4Weight.from_bnb needs a Params4bit with a quant_state (is the layer quantized?)")
        if getattr(state, "quant_type", None) != "nf4":
            raise ValueError(f"only NF4 weights are supported, got quant_type={getattr(state, 'quant_type', None)!r}")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                "this bitsandbytes weight is in bitsandbytes' CPU-packed layout "
                "(quant_state.packing_format_for_cpu); undo it before NF4Weight.from_bnb"
            )
        packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"NF4Weight.from_bnb expects a Params4bit or tensor, got {type(weight).__name__}")
        if packed.dtype != torch.uint8:
            packed = packed.contiguous().view(torch.uint8)
        common = dict(packed=packed.reshape(-1), shape=state.shape, blocksize=state.blocksize, dtype=state.dtype)
        if not state.nested:
            return cls(absmax=state.absmax.float(), **common)
        if state.state2.blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"nested absmax blocksize must be {NESTED_BLOCKSIZE}, got {state.state2.blocksize}")
        return cls(
            absmax=state.absmax,
            nested_absmax=state.state2.absmax,
            nested_code=state.state2.code,
            offset=state.offset.reshape(()).float(),
            **common,
        )

    def to_bnb(self) -> tuple[torch.Tensor, Any]:
        """(packed uint8 ``[ceil(n / 2), 1]``, ``bitsandbytes.functional.QuantState``) sharing our tensors.

        For feeding our weights to bitsandbytes (``dequantize_4bit``, ``matmul_4bit``) in benchmarks
        and tests; bitsandbytes is imported here only.
        """
        from bitsandbytes.functional import QuantState

        code = nf4_code(self.device)
        state2 = None
        if self.double_quant:
            state2 = QuantState(
                absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
            )
        state = QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )
        return self.packed.view(-1, 1), state


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")


def _blockwise_absmax_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale fp32 ``flat`` [n] by per-block absmax into [-1, 1]; returns (scaled [n], absmax [n_blocks]).

    Mirrors bitsandbytes' CPU arithmetic exactly (multiply by the reciprocal for full blocks, divide
    for the trailing one, absmax clamped to 1e-38 before use) so the codes agree bit for bit.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of sorted ``code`` for each value (ties to the lower entry)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


# bitsandbytes' CPU 8-bit quantizer does not search the map per element: it rounds each normalized
# value onto a 65536-point grid over [-1, 1] and reads the code from a table built once per map.
_LUT_POINTS = 65536


def _code_lookup_table(code: torch.Tensor) -> torch.Tensor:
    """uint8 ``[65536]``: for grid point i (value -1 + 2i/65535), the index of the nearest code.

    Same fp32 arithmetic as bitsandbytes' ``build_quantize_lut``: midpoints ``0.5 * (c[j] + c[j+1])``
    and the entry is the number of midpoints strictly below the grid value (ties to the lower code).
    """
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = torch.arange(_LUT_POINTS, dtype=torch.float32, device=code.device)
    grid = -1.0 + (2.0 * grid) / (_LUT_POINTS - 1)
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


def _quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of fp32 ``x`` [n] as bitsandbytes' CPU library (0.50) does it.

    Returns (uint8 codes [n], fp32 absmax [n_blocks]). Per block: ``v = clamp(x * (1 / absmax), -1, 1)``,
    grid index ``trunc(((v + 1) * 0.5) * 65535 + 0.5)`` (each step rounded to fp32), code = table[index];
    an all-zero block stores code 0. The grid is coarser than the map near 0 (step 3e-5 vs entries
    of 1e-6), so this is not always the nearest code, and matching bitsandbytes needs the same grid.
    """
    n = x.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.cat([x, x.new_zeros(n_blocks * blocksize - n)]).reshape(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=-1)
    zero_block = absmax == 0
    # reciprocal first, then multiply: bitsandbytes never divides element by element here
    inv = torch.where(zero_block, torch.zeros_like(absmax), 1.0 / absmax)
    normed = torch.clamp(padded * inv.view(-1, 1), -1.0, 1.0)
    grid_idx = ((((normed + 1.0) * 0.5) * (_LUT_POINTS - 1)) + 0.5).to(torch.int64)  # truncation
    codes = _code_lookup_table(code)[grid_idx]
    codes = torch.where(zero_block.view(-1, 1), torch.zeros_like(codes), codes)
    codes = codes.reshape(-1)
    return (codes[:n].clone() if n < codes.numel() else codes), absmax  # no padding kept alive


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize a dense weight to NF4 exactly as ``bitsandbytes.functional.quantize_4bit`` does.

    Args:
        w: fp32/fp16/bf16 tensor of any shape (usually ``[out_features, in_features]``).
        blocksize: elements per absmax block, a power of two from 32 to 4096.
        double_quant: also quantize the absmax vector (bitsandbytes' ``compress_statistics``).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_nf4 supports float32/float16/bfloat16 weights, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(w.shape)}")
    _check_blocksize(blocksize)
    w = w.detach()
    packed, absmax, nested_absmax, nested_code, offset = torch.ops.fastpeft.quantize_nf4(w, blocksize, double_quant)
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, shape=w.shape, blocksize=blocksize, dtype=w.dtype)
    return NF4Weight(
        packed=packed,
        absmax=absmax,
        shape=w.shape,
        blocksize=blocksize,
        dtype=w.dtype,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        offset=offset,
    )


# Opaque (no Triton kernel inside, and the NaN check reads the data): torch.compile calls it as is.
@torch.library.custom_op("fastpeft::quantize_nf4", mutates_args=())
def _quantize_nf4_op(
    w: torch.Tensor, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, absmax, nested_absmax, nested_code, offset); without double quant the last three are
    empty fp32 tensors (an op returns tensors, never None) and absmax is fp32, else uint8 codes."""
    if not torch.isfinite(w).all():
        raise ValueError("quantize_nf4 got a weight with NaN or inf values")
    scaled, absmax = _blockwise_absmax_scale(w.reshape(-1).float(), blocksize)
    codes = _nearest_code(scaled, nf4_code(w.device))
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])  # pad with the code of 0.0, as bnb does
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return packed, absmax, *(absmax.new_empty(0) for _ in range(3))
    offset = absmax.mean()
    nested_code = dynamic_map(w.device)
    nested_codes, nested_absmax = _quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return packed, nested_codes, nested_absmax, nested_code, offset


@_quantize_nf4_op.register_fake
def _(
    w: torch.Tensor, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs as the real op allocates them (its temporaries: fp32 copies of w, transient)."""
    n = w.numel()
    n_blocks = -(-n // blocksize)
    packed = w.new_empty((n + 1) // 2, dtype=torch.uint8)
    if not double_quant:
        return (
            packed,
            w.new_empty(n_blocks, dtype=torch.float32),
            *(w.new_empty(0, dtype=torch.float32) for _ in range(3)),
        )
    return (
        packed,
        w.new_empty(n_blocks, dtype=torch.uint8),
        w.new_empty(-(-n_blocks // NESTED_BLOCKSIZE), dtype=torch.float32),
        w.new_empty(256, dtype=torch.float32),
        w.new_empty((), dtype=torch.float32),
    )


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
