"""NF4 on the CPU: dequantization and x·Wᵀ fast enough to use (the torch backend's NF4 path).

:func:`fastpeft.kernels.nf4_dequantize.dequantize_nf4_reference` stays the ground truth; CPU tensors run this
file instead (:func:`fastpeft.kernels.nf4_dequantize.dequantize_nf4` dispatches here), and it is tested bit for
bit against the reference.

- :func:`dequantize_nf4_cpu` writes straight into ``out`` (the shared dequant workspace on the
  training path: a fresh 200 MB tensor per call costs more in page faults than the dequantization).
  It runs bitsandbytes' native CPU kernels on our bytes, which are bitsandbytes' bytes, when its
  library is installed: the shared library is loaded with ctypes; the bitsandbytes Python package is
  never imported. Without it: a byte-pair table (one gather of two fp32 values per byte, then the
  per-block scale broadcast), 3-10x the reference's speed.
- :func:`nf4_linear_cpu`, x ``[M, K]`` -> x·Wᵀ + b ``[M, N]``: for bf16 x with M <= ``GEMV_MAX_ROWS``
  bitsandbytes' fused 4-bit GEMV (it never writes a dense W), else dequantize into the workspace and
  one GEMM (oneDNN/MKL), whose cost hardly grows with M.

Where bitsandbytes' CPU kernels are wrong, and the guards:

- ``cdequantize_blockwise_cpu_nf4_*(A, absmax, out, blocksize, rows, cols)`` finds the scale of row r,
  column c at ``absmax[r·(cols / blocksize) + c / blocksize]``: right only when ``cols`` is a multiple
  of the blocksize. bitsandbytes calls it with the weight's own shape, hence its wrong answers for
  (64, 64) with blocksize 128 or (33, 80) with 64 (tests/kernels/test_nf4.py). The CPU repack
  (``packing_format_for_cpu``) plays no part. We always call it with rows of exactly one block, right
  for every shape; the trailing partial block (numel % blocksize) goes through the table. bitsandbytes
  itself avoids the kernel for blocksize >= 2048 on AVX-512 ("accuracy issues"): so do we.
- The GEMV needs bitsandbytes' CPU layout (codes interleaved in 32-row groups, the absmax transposed
  and in bf16), so the first call on a weight builds that copy (+0.5 byte per weight) and caches it,
  keyed by the weight's storage and invalidated when that storage is freed or written in place (the
  fp32 scales of a double-quantized weight are cached the same way). It needs AVX512-BF16
  (checked), N % 32 == 0 and K % blocksize == 0; other shapes take the GEMM path.
  Its numerics are bitsandbytes' (bf16 absmax), which is why only bf16 inputs use it.
- On first use every native kernel is run on a small random case and compared with the reference
  (bit for bit for dequantization, to bf16 rounding for the GEMV); one that disagrees is never used.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from fastpeft.kernels.backend import tracing
from fastpeft.kernels.nf4 import NESTED_BLOCKSIZE, NF4Weight, nf4_code, quantize_nf4
from fastpeft.kernels.nf4_dequantize import dequantize_nf4_reference
from fastpeft.kernels.workspace import get_workspace

# one thread, bf16, 512-1536 wide layers: the GEMV's time grows with M, dequantize + GEMM's hardly;
# they cost the same at 16 rows
GEMV_MAX_ROWS = 16
_NATIVE_MAX_BLOCKSIZE = 1024
_NATIVE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_TABLE_CHUNK = 1 << 20  # elements per table-path chunk: its temporaries stay in cache
_c_ptr, _c_i64 = ctypes.c_void_p, ctypes.c_longlong


# ----------------------------------------------------------------------------------------------
# bitsandbytes' native CPU library


@dataclasses.dataclass
class _Native:
    """The checked entry points of bitsandbytes' CPU library (None: missing or failed its check)."""

    nf4: dict[torch.dtype, object]  # dtype -> cdequantize_blockwise_cpu_nf4_<dtype>
    blockwise_fp32: object | None  # 8-bit blockwise dequantization (double-quantized absmax)
    gemv_bf16: object | None  # gemv_4bit_inference_cpu_nf4_bf16


def _library_path() -> Path | None:
    spec = importlib.util.find_spec("bitsandbytes")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    path = Path(next(iter(spec.submodule_search_locations))) / f"libbitsandbytes_cpu{suffix}"
    return path if path.is_file() else None


def _declare(lib: ctypes.CDLL, name: str, argtypes: list) -> object | None:
    fn = getattr(lib, name, None)
    if fn is not None:
        fn.argtypes, fn.restype = argtypes, None
    return fn


@functools.lru_cache(maxsize=1)
def native() -> _Native:
    """bitsandbytes' CPU kernels, loaded and self-checked once (all None when unavailable)."""
    none = _Native({}, None, None)
    path = _library_path()
    if path is None:
        return none
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return none
    nf4 = {
        dt: _declare(lib, f"cdequantize_blockwise_cpu_nf4_{s}", [_c_ptr, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_i64])
        for dt, s in _NATIVE_DTYPES.items()
    }
    blockwise = _declare(lib, "cdequantize_blockwise_cpu_fp32", [_c_ptr] * 4 + [_c_i64, _c_i64])
    gemv = _declare(lib, "gemv_4bit_inference_cpu_nf4_bf16", [_c_i64] * 3 + [_c_ptr] * 4 + [_c_i64] * 3)
    has_bf16 = getattr(lib, "has_avx512bf16_cpu", None)
    if has_bf16 is not None:
        has_bf16.restype = ctypes.c_bool
    found = _Native(
        {dt: fn for dt, fn in nf4.items() if fn is not None},
        blockwise,
        gemv if has_bf16 is not None and has_bf16() else None,
    )
    with torch.inference_mode(False), torch.no_grad():  # the first call may come from inside either
        return _self_checked(found)


def _self_checked(found: _Native) -> _Native:
    """Drop every kernel that disagrees with the reference on a small random weight."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 192, generator=gen)  # 48 blocks of 256 -> 1 nested block; 192 = 3 blocks of 64
    q = quantize_nf4(w, 64, double_quant=True)
    checked = _Native({}, None, None)
    if found.blockwise_fp32 is not None:
        checked.blockwise_fp32 = found.blockwise_fp32
        if not torch.equal(_absmax_native(q, checked), q.absmax_fp32()):
            checked.blockwise_fp32 = None
    plain = NF4Weight(q.packed, q.absmax_fp32(), q.shape, 64, torch.float32)
    for dtype, fn in found.nf4.items():
        out = torch.full(q.shape, float("nan"), dtype=dtype)
        _dequant_native_blocks(fn, plain.packed, plain.absmax, out.view(-1), 64, q.numel)
        if torch.equal(out, dequantize_nf4_reference(plain, dtype)):
            checked.nf4[dtype] = fn
    if found.gemv_bf16 is not None:
        x = torch.randn(3, 192, generator=gen).bfloat16()
        checked.gemv_bf16 = found.gemv_bf16
        got = _gemv(x, plain, checked).float()
        want = x.float() @ dequantize_nf4_reference(plain, torch.float32).t()
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
            checked.gemv_bf16 = None
        _derived.pop(_weight_key(plain), None)
    return checked


# ----------------------------------------------------------------------------------------------
# dequantization


def _plain_cpu(*tensors: torch.Tensor | None) -> bool:
    """Real CPU tensors with memory behind them (not fake/meta/functional wrappers), outside a
    torch.compile trace (which gets the traceable reference instead): ctypes may read them."""
    if torch.compiler.is_compiling() or tracing(*tensors):
        return False
    return all(t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu") for t in tensors)


def _absmax_native(q: NF4Weight, lib: _Native) -> torch.Tensor:
    """fp32 scales of a double-quantized weight: ``code[q] * nested_absmax[block]`` in bitsandbytes'
    C (the same fp32 product as :meth:`NF4Weight.absmax_fp32`), then ``+ offset`` in torch."""
    out = torch.empty(q.absmax.numel(), dtype=torch.float32)
    pointers = (q.nested_code, q.absmax, q.nested_absmax, out)
    lib.blockwise_fp32(*(_c_ptr(t.data_ptr()) for t in pointers), NESTED_BLOCKSIZE, out.numel())
    return out.add_(q.offset)


def _dequant_native_blocks(
    fn, packed: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor, blocksize: int, n: int
) -> None:
    """The first ``n`` elements (a multiple of the blocksize) into ``out``, one block per kernel row."""
    fn(
        _c_ptr(packed.data_ptr()),
        _c_ptr(absmax.data_ptr()),
        _c_ptr(out.data_ptr()),
        blocksize,
        n // blocksize,
        blocksize,
    )


@functools.cache
def _byte_pair_table() -> torch.Tensor:
    """``[256]`` float64 words, each the two fp32 NF4 values of byte b's high then low nibble: one
    8-byte gather per byte yields both elements in order (``.view(torch.float32)``)."""
    code = nf4_code()
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous().view(torch.float64).view(-1)


def _dequant_table(
    packed: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor, blocksize: int, start: int, stop: int
) -> None:
    """Elements ``[start, stop)`` of the flat weight into ``out[start:stop]`` (start block-aligned):
    the byte-pair gather, then the fp32 scale per block (written into ``out`` when it is fp32)."""
    table = _byte_pair_table()
    step = max(blocksize, _TABLE_CHUNK - _TABLE_CHUNK % blocksize)
    for lo in range(start, stop, step):
        hi = min(lo + step, stop)
        values = table.index_select(0, packed[lo // 2 : (hi + 1) // 2].int()).view(torch.float32)[: hi - lo]
        dest = out[lo:hi] if out.dtype == torch.float32 else torch.empty_like(values)
        full = (hi - lo) - (hi - lo) % blocksize
        first = lo // blocksize
        if full:
            torch.mul(
                values[:full].view(-1, blocksize),
                absmax[first : first + full // blocksize, None],
                out=dest[:full].view(-1, blocksize),
            )
        if full < hi - lo:  # the weight's trailing partial block
            torch.mul(values[full:], absmax[first + full // blocksize], out=dest[full:])
        if dest.data_ptr() != out[lo:hi].data_ptr():
            out[lo:hi].copy_(dest)


def dequantize_nf4_cpu(q: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bit-identical to :func:`~fastpeft.kernels.nf4_dequantize.dequantize_nf4_reference` (arguments already
    checked by :func:`~fastpeft.kernels.nf4_dequantize.dequantize_nf4`), for CPU tensors."""
    out = torch.empty(q.shape, dtype=dtype) if out is None else out
    if not _plain_cpu(*q.tensors().values(), out):
        return out.copy_(dequantize_nf4_reference(q, dtype))
    flat = out.view(-1)
    absmax = absmax_fp32_cpu(q)
    fn = native().nf4.get(dtype) if q.blocksize <= _NATIVE_MAX_BLOCKSIZE else None
    done = 0
    if fn is not None:
        done = q.numel - q.numel % q.blocksize
        if done:
            _dequant_native_blocks(fn, q.packed, absmax, flat, q.blocksize, done)
    if done < q.numel:
        _dequant_table(q.packed, absmax, flat, q.blocksize, done, q.numel)
    return out


# ----------------------------------------------------------------------------------------------
# x·Wᵀ


@dataclasses.dataclass
class _Derived:
    """Tensors derived from one NF4 weight, kept while its storage lives and is not written to."""

    source: tuple[StorageWeakRef, ...]  # the NF4 tensors they were made from
    versions: tuple[int, ...]
    absmax: torch.Tensor | None = None  # fp32 [n_blocks]: double quantization undone once, not per call
    gemv: tuple[torch.Tensor, torch.Tensor] | None = None  # uint8 [N, K/2] in bnb's CPU order, bf16 [K/bs, N]

    def current(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        return all(not ref.expired() for ref in self.source) and self.versions == _versions(tensors)


_derived: dict[tuple[int, int, int], _Derived] = {}


def _versions(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    # inference tensors keep no version counter (and cannot be written outside inference mode)
    return tuple(-1 if torch.is_inference(t) else t._version for t in tensors)


def _weight_key(q: NF4Weight) -> tuple[int, int, int]:
    return (q.packed.untyped_storage().data_ptr(), q.packed.storage_offset(), q.numel)


def _derived_for(q: NF4Weight) -> _Derived:
    """The cache entry of ``q`` (a fresh one when ``q``'s tensors changed or were freed)."""
    tensors = tuple(q.tensors().values())
    key = _weight_key(q)
    entry = _derived.get(key)
    if entry is not None and entry.current(tensors):
        return entry
    for stale in [k for k, v in _derived.items() if any(r.expired() for r in v.source)]:
        del _derived[stale]  # weights freed since: drop what was derived from them
    entry = _Derived(tuple(StorageWeakRef(t.untyped_storage()) for t in tensors), _versions(tensors))
    _derived[key] = entry
    return entry


def absmax_fp32_cpu(q: NF4Weight, lib: _Native | None = None) -> torch.Tensor:
    """:meth:`NF4Weight.absmax_fp32`, bit for bit: with double quantization computed once per weight
    (bitsandbytes' C kernel where available) and cached (+4 bytes per block, 1/16 byte per weight)."""
    if not q.double_quant:
        return q.absmax
    if not _plain_cpu(*q.tensors().values()):
        return q.absmax_fp32()
    entry = _derived_for(q)
    if entry.absmax is None:
        lib = lib or native()
        with torch.inference_mode(False), torch.no_grad():
            entry.absmax = _absmax_native(q, lib) if lib.blockwise_fp32 is not None else q.absmax_fp32()
    return entry.absmax


def _repack_for_gemv(q: NF4Weight, lib: _Native) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``_convert_weight_packed_for_cpu``, written from its definition: rows in groups
    of 32; for group g and byte column j, byte p (0..31) holds the code of row 16 + p // 2 in its high
    nibble and of row p // 2 in its low nibble, both at column 2j + p % 2. Absmax: [K / bs, N] bf16."""
    n, k = q.shape
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).view(n // 32, 32, k // 2, 2)
    grouped = codes.transpose(1, 2).reshape(-1, 64)  # [N/32 * K/2, 64]: 32 rows x 2 elements
    packed = ((grouped[:, 32:] << 4) | grouped[:, :32]).reshape(n, k // 2).contiguous()
    absmax = absmax_fp32_cpu(q, lib).view(n, k // q.blocksize).t().to(torch.bfloat16).contiguous()
    return packed, absmax


def _gemv_layout(q: NF4Weight, lib: _Native) -> tuple[torch.Tensor, torch.Tensor]:
    entry = _derived_for(q)
    if entry.gemv is None:
        with torch.inference_mode(False), torch.no_grad():
            entry.gemv = _repack_for_gemv(q, lib)
    return entry.gemv


def clear_derived() -> None:
    """Free every cached scale vector and GEMV copy of NF4 weights (they are rebuilt on demand)."""
    _derived.clear()


def gemv_applicable(x: torch.Tensor, q: NF4Weight) -> bool:
    """Whether :func:`nf4_linear_cpu` takes bitsandbytes' GEMV for this call."""
    n, k = q.shape
    return (
        x.dtype == torch.bfloat16
        and x.shape[0] <= GEMV_MAX_ROWS
        and len(q.shape) == 2
        and n % 32 == 0
        and k % q.blocksize == 0
        and x.stride(-1) == 1
        and _plain_cpu(x, *q.tensors().values())
        and native().gemv_bf16 is not None
    )


def _gemv(x: torch.Tensor, q: NF4Weight, lib: _Native | None = None) -> torch.Tensor:
    lib = lib or native()
    packed, absmax = _gemv_layout(q, lib)
    m, k = x.shape
    n = q.shape[0]
    out = torch.empty((m, n), dtype=torch.bfloat16)
    lib.gemv_bf16(
        m,
        n,
        k,
        _c_ptr(x.data_ptr()),
        _c_ptr(packed.data_ptr()),
        _c_ptr(absmax.data_ptr()),
        _c_ptr(out.data_ptr()),
        q.blocksize,
        x.stride(0),
        out.stride(0),
    )
    return out


def nf4_linear_cpu(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[M, K]`` -> x·Wᵀ + b ``[M, N]`` in x's dtype, for a CPU :class:`NF4Weight` W ``[N, K]``.

    Not differentiable by autograd (the dense W lives in the shared workspace): callers are the
    forward and backward of autograd Functions.
    """
    if gemv_applicable(x, q):
        y = _gemv(x, q)
        return y if bias is None else y.add_(bias)
    w = dense_weight_cpu(q, x.dtype)
    return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())


def dense_weight_cpu(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W ``[N, K]`` dequantized into the shared ``nf4_dequant`` workspace (valid until the next call)."""
    buf = get_workspace("nf4_dequant", q.numel, dtype, q.device).view(q.shape)
    return dequantize_nf4_cpu(q, dtype, buf)
