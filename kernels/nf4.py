"""NF4 4-bit weights in exactly bitsandbytes' format, and their quantization.

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

:class:`NF4Weight` holds one such weight; :func:`quantize_nf4` makes it (custom op
``fastpeft::quantize_nf4``: torch, opaque). Dequantization, in registers for the fused kernels and to a
dense tensor, is :mod:`fastpeft.kernels.nf4_dequantize`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from fastpeft.kernels._constants import FLOAT_DTYPES
from fastpeft.kernels.backend import tracing

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
