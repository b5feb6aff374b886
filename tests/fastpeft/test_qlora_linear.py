"""QLoRALinear: NF4 base + adapters vs a float64 reference on the dequantized weight; bnb wrapping."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from fastpeft import QLoRALinear
from fastpeft.kernels.nf4 import quantize_nf4
from fastpeft.kernels.nf4_dequantize import dequantize_nf4

TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 6e-2, 2e-2)]
SHAPES = [(1, 33, 7, 2), (5, 64, 40, 4), (17, 48, 19, 8)]  # (M, in, out, r): partial last NF4 block too


def _qlayer(
    k: int, n: int, r: int, dtype: torch.dtype, double_quant: bool = True, seed: int = 0, **kw
) -> tuple[QLoRALinear, nn.Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n)
    layer = QLoRALinear.from_linear(
        linear, r=r, lora_alpha=r + 1, double_quant=double_quant, compute_dtype=dtype, init_lora_weights=False, **kw
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.5)
    return layer, linear


def _reference(layer: QLoRALinear, x64: torch.Tensor, a64: torch.Tensor, b64: torch.Tensor) -> torch.Tensor:
    w = dequantize_nf4(layer.nf4_weight(), torch.float32).double()  # the exact NF4 values
    y = x64 @ w.t() + layer.scaling * (x64 @ a64.t()) @ b64.t()
    if layer.active.variant == "dora":
        norm = (w + layer.scaling * b64.detach() @ a64.detach()).norm(dim=1)
        y = y * (layer.active.magnitude.double() / norm)
    return y + layer.bias.double()


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant,double_quant", [("lora", True), ("lora", False), ("dora", True)])
def test_forward_and_grads_match_dequantized_reference(dtype, atol, rtol, shape, variant, double_quant):
    m, k, n, r = shape
    layer, _ = _qlayer(k, n, r, dtype, double_quant, use_dora=variant == "dora")
    assert layer.dtype == dtype and not any(p.dtype == torch.uint8 for p in layer.parameters())
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    y = layer(x)
    x64 = x.detach().double().requires_grad_(True)
    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    y64 = _reference(layer, x64, a64, b64)
    scale = max(1.0, y64.abs().max().item())
    torch.testing.assert_close(y.double(), y64.detach(), atol=atol * scale, rtol=rtol)
    grad_y = torch.randn(m, n, dtype=torch.float64)
    y.backward(grad_y.to(dtype))
    y64.backward(grad_y)
    for got, want in ((x.grad, x64.grad), (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, atol=4 * atol * max(1.0, want.abs().max().item()), rtol=4 * rtol)


def test_quantized_base_is_bitsandbytes_format_and_buffers():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    layer = QLoRALinear.from_linear(linear, r=4, lora_alpha=8, blocksize=64, double_quant=True)
    expected = quantize_nf4(linear.weight.detach(), 64, double_quant=True)
    assert torch.equal(layer.packed, expected.packed) and torch.equal(layer.absmax, expected.absmax)
    names = {n for n, _ in layer.named_buffers()}
    assert {"packed", "absmax", "nested_absmax", "nested_code", "offset"} <= names
    assert all(p.dtype != torch.float32 or p.numel() < 40 * 24 for p in layer.state_dict().values())  # no dense copy
    assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.shape == (24, 40)  # bnb's Params4bit view
    assert layer.weight.data_ptr() == layer.packed.data_ptr()
    x = torch.randn(3, 40)
    dense = nn.functional.linear(x, dequantize_nf4(expected, torch.float32), linear.bias)
    torch.testing.assert_close(layer(x), dense, atol=1e-6, rtol=1e-6)  # B = 0: the NF4 base only


def test_state_dict_round_trip_and_dtype_casts_keep_nf4():
    layer, _ = _qlayer(48, 20, 3, torch.float32, use_dora=True)
    state = layer.state_dict()
    assert state["packed"].dtype == torch.uint8 and "_compute_marker" not in state
    other, _ = _qlayer(48, 20, 3, torch.float32, use_dora=True, seed=5)
    x = torch.randn(4, 48)
    assert not torch.allclose(other(x), layer(x))
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), layer(x), atol=0, rtol=0)

    packed, absmax, offset = layer.packed.clone(), layer.absmax.clone(), layer.offset.clone()
    layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.bfloat16
    assert torch.equal(layer.packed, packed) and torch.equal(layer.absmax, absmax)
    assert layer.offset.dtype == torch.float32 and torch.equal(layer.offset, offset)
    y = layer(x.bfloat16())
    torch.testing.assert_close(y.float(), other(x), atol=0.1, rtol=0.05)
    with pytest.raises(TypeError, match=r"torch.float32.*torch.bfloat16"):
        layer(x)
    with pytest.raises(ValueError, match=r"meta.*cpu"):
        layer(torch.empty(2, 48, device="meta", dtype=torch.bfloat16))


@pytest.mark.parametrize("double_quant", [True, False])
def test_merge_and_unmerge_requantize_to_exactly_the_bytes_of_the_merged_weight(double_quant, nf4):
    layer, _ = _qlayer(64, 32, 4, torch.float32, double_quant)
    w = dequantize_nf4(layer.nf4_weight(), torch.float32)
    delta = layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach())  # s·B·A [out, in], fp32
    x = torch.randn(6, 64)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    merged = nf4.bnb(w + delta, double_quant)
    assert layer.merged_adapter == "default"
    nf4.assert_same(layer.nf4_weight(), merged)
    # merged, the layer is its base only: x·W'ᵀ + b with W' the re-quantized merged weight
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dequantize_nf4(merged, torch.float32), layer.bias))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.unmerge()
    nf4.assert_same(layer.nf4_weight(), nf4.bnb(dequantize_nf4(merged, torch.float32) - delta, double_quant))


def _bnb_linear4bit(linear: nn.Linear, double_quant: bool):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=True,
        compute_dtype=torch.float32,
        quant_type="nf4",
        compress_statistics=double_quant,
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant
    )
    layer.bias = nn.Parameter(linear.bias.data.clone())
    return layer.to("cpu")


@pytest.mark.parametrize("double_quant", [True, False])
def test_from_bnb_shares_data_and_matches_bitsandbytes(double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    bnb_layer = _bnb_linear4bit(linear, double_quant)
    layer = QLoRALinear.from_bnb(bnb_layer, r=4, lora_alpha=8)
    assert layer.packed.data_ptr() == bnb_layer.weight.data.data_ptr()  # not re-quantized
    ours = quantize_nf4(linear.weight.detach(), 64, double_quant)
    assert torch.equal(layer.packed, ours.packed)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), bnb_layer(x), atol=1e-5, rtol=1e-5)


def _repack(bnb_layer, x):
    """bnb's CPU repack: through its eval forward on CPUs with AVX512-BF16, else its own function."""
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        bnb_layer.eval()(x)
    state = bnb_layer.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        bnb_layer.weight.data, bnb_layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu(
            bnb_layer.weight.data, state
        )


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (64, 192)])  # (in, out); bnb needs out % 32 == 0
def test_from_bnb_after_bitsandbytes_cpu_repacking(double_quant, shape):
    """After the repack the layer computes with the fp32 scales rounded to bf16 (what bnb keeps),
    on the original codes; with double quant off bnb's own inverse would transpose the scales."""
    torch.manual_seed(1)
    linear = nn.Linear(*shape)
    bnb_layer = _bnb_linear4bit(linear, double_quant)
    exact = quantize_nf4(linear.weight.detach(), 64, double_quant=double_quant)
    x = torch.randn(3, shape[0])
    _repack(bnb_layer, x)
    layer = QLoRALinear.from_bnb(bnb_layer, r=2, lora_alpha=4)
    assert torch.equal(layer.packed, exact.packed) and not layer.double_quant
    rounded = dataclasses.replace(
        exact, absmax=exact.absmax_fp32().to(torch.bfloat16).float(), nested_absmax=None, nested_code=None, offset=None
    )
    assert torch.equal(layer.absmax, rounded.absmax)
    want = nn.functional.linear(x, dequantize_nf4(rounded, torch.float32), linear.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)  # B = 0: the base only
        bnb_layer.support_avx512bf16_for_cpu = False  # else its eval forward would repack again
        y_bnb = bnb_layer(x)  # bnb's standard path on the restored layer reads the same weight
    torch.testing.assert_close(y_bnb, want, atol=1e-5, rtol=1e-5)


def test_unknown_bnb_cpu_layout_is_refused():
    torch.manual_seed(1)
    bnb_layer = _bnb_linear4bit(nn.Linear(64, 64), double_quant=False)
    _repack(bnb_layer, torch.randn(2, 64))
    bnb_layer.weight.quant_state.absmax = bnb_layer.weight.quant_state.absmax.reshape(-1)  # not bnb's [K/bs, N]
    with pytest.raises(ValueError, match="CPU layout"):
        QLoRALinear.from_bnb(bnb_layer, r=2, lora_alpha=4)


def test_get_base_layer_shares_the_nf4_bytes():
    bnb = pytest.importorskip("bitsandbytes")
    layer, _ = _qlayer(64, 32, 2, torch.float32)
    base = layer.get_base_layer()
    assert isinstance(base, bnb.nn.Linear4bit) and base.bias is layer.bias
    assert base.weight.data_ptr() == layer.packed.data_ptr() and layer.base_layer.weight.quant_state.nested
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = nn.functional.linear(x, layer.dense_weight(torch.float32), layer.bias)
        torch.testing.assert_close(base.eval()(x), want, atol=1e-5, rtol=1e-5)
    assert not base.weight.quant_state.__dict__.get("packing_format_for_cpu", False)  # never repacked


@pytest.mark.triton
def test_qlora_fused_path_in_triton_interpreter():
    layer, _ = _qlayer(64, 24, 4, torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    a64, b64 = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    y = layer(x)
    torch.testing.assert_close(y.double(), _reference(layer, x.detach().double(), a64, b64), atol=1e-4, rtol=1e-4)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.lora_A.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 40])  # decode kernel (M <= 16) and the training path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_cuda_forward_and_grads_after_to_device(m, dtype, variant):
    layer, _ = _qlayer(96, 80, 8, dtype, use_dora=variant == "dora")
    layer.to("cuda")
    assert layer.packed.device.type == "cuda" and layer.packed.dtype == torch.uint8
    x = torch.randn(m, 96, dtype=dtype, device="cuda", requires_grad=True)
    y = layer(x)
    x64 = x.detach().double().requires_grad_(True)
    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    y64 = _reference(layer, x64, a64, b64)
    scale = max(1.0, y64.abs().max().item())
    torch.testing.assert_close(y.double(), y64.detach(), atol=6e-2 * scale, rtol=2e-2)
    grad_y = torch.randn_like(y64)
    y.backward(grad_y.to(dtype))
    y64.backward(grad_y)
    for got, want in ((x.grad, x64.grad), (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, atol=0.25 * max(1.0, want.abs().max().item()), rtol=8e-2)
