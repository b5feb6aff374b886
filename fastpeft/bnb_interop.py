"""bitsandbytes ``Linear4bit`` layers and our :class:`NF4Weight`, both ways, without copies.

**bitsandbytes' CPU repack.** On a CPU with AVX512-BF16, the first eval-mode, no-grad forward of a
``Linear4bit`` rewrites its weight in place for bnb's CPU kernel (``_convert_weight_packed_for_cpu``,
bitsandbytes 0.50): the codes are permuted into ``[N, K/2]`` tiles, the block scales become bf16
``[K / blocksize, N]`` (transposed, one row of blocks per input column group) and double
quantization is dropped (the nested codes are dequantized and discarded). bnb's own inverse
(used by its ``.cuda()`` and ``state_dict()``) restores the codes but, without double quant, leaves
the scales transposed (every block then reads another block's scale), and with double quant
re-quantizes the bf16 scales. :func:`restore_nf4_layout` undoes the repack exactly instead: the
standard code order and the fp32 values of exactly the bf16 scales bnb computes with, not nested
(the nested codes no longer exist). Nothing is re-quantized. Two facts from bnb 0.50.2 worth knowing:

- after the repack bnb's CPU matmul (``gemv_4bit``) has no autograd formula: a loss computed through
  the layer sends no gradient to its input (torch only warns);
- bnb's CPU kernels (the repacked gemv and the C ``dequantize_4bit``) read block ``row * (K // bs) +
  col // bs``, i.e. they assume every weight row splits into whole blocks. That equals the standard
  flat layout only when ``in_features % blocksize == 0`` (the disagreement noted in kernels/nf4_dequantize.py).

:func:`linear4bit_view` builds a ``Linear4bit`` whose ``Params4bit`` and ``QuantState`` share a
:class:`NF4Weight`'s tensors (for ``get_base_layer()`` and the conversion to a PeftModel).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from fastpeft.kernels.nf4 import NF4Weight

_REPACK_BLOCK_N = 32  # bnb's tile height (``block_n``) in _convert_weight_packed_for_cpu


def _bnb():
    return sys.modules.get("bitsandbytes")


def is_linear4bit(module: object) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_cpu_repacked(linear4bit: nn.Module) -> bool:
    """True when bitsandbytes has rewritten this layer's weight into its CPU-kernel layout."""
    return bool(getattr(getattr(linear4bit.weight, "quant_state", None), "packing_format_for_cpu", False))


def _unpermute_codes(tiles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bnb's CPU tiles ``[N, K/2]`` -> standard NF4 bytes ``[N*K/2]`` (first element in the high nibble).

    The repack cut the ``[N, K]`` codes into ``[N/32, 32, K/2, 2]``, swapped the two middle axes and
    stored each run of 64 codes as 32 bytes (codes 0..31 in the low nibbles, 32..63 in the high ones).
    """
    runs = tiles.reshape(-1, 32)
    codes = torch.cat([runs & 0xF, runs >> 4], dim=1)  # [-1, 64]
    codes = codes.reshape(n // _REPACK_BLOCK_N, k // 2, _REPACK_BLOCK_N, 2).transpose(1, 2).reshape(n, k)
    return ((codes[:, 0::2] << 4) | codes[:, 1::2]).reshape(-1)


@torch.no_grad()
def restore_nf4_layout(linear4bit: nn.Module) -> bool:
    """Undo bitsandbytes' CPU repack of ``linear4bit`` in place (see the module docstring).

    Afterwards ``linear4bit.weight`` holds standard NF4 bytes and fp32 block scales (exactly the bf16
    values bnb computed with), and bnb's own forward, ``state_dict`` and :meth:`NF4Weight.from_bnb`
    all read it correctly. Returns True if a repack was undone. ValueError if the layout is not one
    this function understands (then nothing is changed).
    """
    if not is_cpu_repacked(linear4bit):
        return False
    weight = linear4bit.weight
    state = weight.quant_state
    n, k = (int(d) for d in state.shape)
    blocks_per_row = k // state.blocksize
    tiles = weight.data
    layout_ok = (
        tiles.dtype == torch.uint8
        and tuple(tiles.shape) == (n, k // 2)
        and n % _REPACK_BLOCK_N == 0
        and k % state.blocksize == 0
        and tuple(state.absmax.shape) == (blocks_per_row, n)
    )
    if not layout_ok:
        raise ValueError(
            f"{type(linear4bit).__name__} [{n}, {k}] holds a bitsandbytes CPU layout this fastpeft does not know "
            f"(codes {tuple(tiles.shape)} {tiles.dtype}, scales {tuple(state.absmax.shape)}, blocksize "
            f"{state.blocksize}); move the model to the GPU or reload it before wrapping"
        )
    packed = _unpermute_codes(tiles, n, k).reshape(getattr(state, "original_qshape", (n * k // 2, 1)))
    storage = getattr(state, "original_storage_type", None)
    weight.data = packed.view(storage) if storage is not None else packed
    state.absmax = state.absmax.t().reshape(-1).float()  # [K/bs, N] -> flat row-major blocks, exact
    state.dtype = getattr(state, "original_dtype", state.dtype)
    state.nested = False  # the repack discarded the nested codes; the fp32 scales are exact
    state.packing_format_for_cpu = False
    return True


def keep_standard_layout(linear4bit: nn.Module, keep: bool = True) -> None:
    """Stop (``keep=True``) or allow again bnb's CPU repack on this instance's next eval forward."""
    if keep:
        linear4bit.__dict__.setdefault("_fastpeft_repack_flag", linear4bit.support_avx512bf16_for_cpu)
        linear4bit.support_avx512bf16_for_cpu = False
    elif "_fastpeft_repack_flag" in linear4bit.__dict__:
        linear4bit.support_avx512bf16_for_cpu = linear4bit.__dict__.pop("_fastpeft_repack_flag")


def nf4_from_linear4bit(linear4bit: nn.Module) -> NF4Weight:
    """The layer's NF4 weight as an :class:`NF4Weight` sharing bnb's tensors (repack undone first)."""
    restore_nf4_layout(linear4bit)
    return NF4Weight.from_bnb(linear4bit.weight)


def linear4bit_view(weight: NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` whose weight and quant state share ``weight``'s tensors, and
    whose bias is ``bias`` (the same Parameter). Never repacked for bnb's CPU kernel."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=weight.double_quant,
        quant_type="nf4",
        device="meta",
    )
    packed, state = weight.to_bnb()
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=weight.blocksize,
        compress_statistics=weight.double_quant,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state
    layer.bias = bias
    keep_standard_layout(layer)
    return layer
