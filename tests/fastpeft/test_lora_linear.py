"""LoRALinear / DoRA module: forward and gradients against float64 references, errors, state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastpeft import LoRALinear
from fastpeft.lifecycle import route_adapters

# (dtype, atol, rtol) for the forward; gradients get 4x
TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-2, 1e-2), (torch.bfloat16, 6e-2, 2e-2)]
SHAPES = [(1, 7, 5, 2), (3, 16, 33, 4), (17, 31, 9, 8)]  # (M, in, out, r)


def _layer(m_in: int, n_out: int, r: int, dtype: torch.dtype, bias: bool = True, seed: int = 0, **kw) -> LoRALinear:
    torch.manual_seed(seed)
    linear = nn.Linear(m_in, n_out, bias=bias).to(dtype)
    layer = LoRALinear.from_linear(linear, r=r, lora_alpha=2 * r, init_lora_weights=False, **kw)
    with torch.no_grad():  # fresh non-zero values for every tensor
        for p in layer.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.5)
    return layer


def _reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """float64 y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ (or DoRA's rescaled form), autograd-capable in A, B, x."""
    w = layer.weight.double()
    a = layer.lora_A.double()
    b = layer.lora_B.double()
    y = x @ w.t() + layer.scaling * (x @ a.t()) @ b.t()
    if layer.active.variant == "dora":
        norm = (w + layer.scaling * b.detach() @ a.detach()).norm(dim=1)
        y = y * (layer.active.magnitude.double() / norm)
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_forward_and_grads_match_float64(dtype, atol, rtol, shape, variant):
    m, k, n, r = shape
    layer = _layer(k, n, r, dtype, bias=n % 2 == 1, use_dora=variant == "dora")
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (m, n)
    params = [layer.lora_A, layer.lora_B] + ([layer.active.magnitude] if variant == "dora" else [])
    x64 = x.detach().double().requires_grad_(True)
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    with torch.no_grad():
        y64 = _reference(layer, x64)
    torch.testing.assert_close(y.double(), y64, atol=atol * max(1.0, y64.abs().max().item()), rtol=rtol)

    grad_y = torch.randn(m, n, dtype=torch.float64)
    y.backward(grad_y.to(dtype))
    # float64 autograd through the same formula, with the float64 copies of the parameters
    w, bias = layer.weight.double(), None if layer.bias is None else layer.bias.double()
    y_ref = x64 @ w.t() + layer.scaling * (x64 @ p64[0].t()) @ p64[1].t()
    if variant == "dora":
        norm = (w + layer.scaling * p64[1].detach() @ p64[0].detach()).norm(dim=1)
        y_ref = y_ref * (p64[2] / norm)
    if bias is not None:
        y_ref = y_ref + bias
    y_ref.backward(grad_y)
    for got, want in [(x.grad, x64.grad)] + [(p.grad, q.grad) for p, q in zip(params, p64)]:
        assert got is not None and torch.isfinite(got).all()
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=4 * atol * scale, rtol=4 * rtol)


def test_leading_dims_flattened_and_new_adapter_is_noop():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    layer = LoRALinear.from_linear(linear, r=4, lora_alpha=8)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(12)  # kaiming-uniform(a=sqrt 5) as PEFT
    assert layer.lora_A.abs().max() <= bound
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(layer(x), linear(x), atol=0, rtol=0)
    assert layer.weight is linear.weight and not layer.weight.requires_grad


def test_rslora_scaling():
    linear = nn.Linear(8, 8)
    assert LoRALinear.from_linear(linear, r=16, lora_alpha=8).scaling == pytest.approx(0.5)
    assert LoRALinear.from_linear(linear, r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(2.0)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_dropout_path_matches_unfused_formula_and_trains(variant):
    layer = _layer(10, 6, 3, torch.float32, use_dora=variant == "dora", lora_dropout=0.5)
    layer.train()
    x = torch.randn(5, 10)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x.double(), p=0.5, training=True)
    w, b = layer.weight.double(), layer.bias.double()
    lora = layer.scaling * (dropped @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
    if variant == "dora":  # PEFT: base(x) + (scale - 1)·(dropout(x)·Wᵀ) + scale·lora(dropout(x))
        norm = (w + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()).norm(dim=1)
        scale = layer.active.magnitude.double() / norm
        want = x.double() @ w.t() + b + (scale - 1) * (dropped @ w.t()) + scale * lora
    else:
        want = x.double() @ w.t() + b + lora
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _reference(layer, x.double()), atol=1e-5, rtol=1e-5)

    target = torch.randn(5, 6)
    with torch.no_grad():
        eval_before = nn.functional.mse_loss(layer(x), target).item()
    layer.train()
    optimizer = torch.optim.Adam(layer.adapter_params(), lr=0.05)
    torch.manual_seed(0)
    for _ in range(40):
        loss = nn.functional.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layer.eval()
    with torch.no_grad():
        assert nn.functional.mse_loss(layer(x), target).item() < 0.7 * eval_before
    assert layer.weight.grad is None


def test_trainable_base_weight_gets_its_gradient():
    layer = _layer(6, 4, 2, torch.float32)
    layer.weight.requires_grad_(True)
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_bad_inputs_are_rejected():
    layer = _layer(8, 4, 2, torch.float32)
    with pytest.raises(TypeError, match=r"torch.float16.*torch.float32"):
        layer(torch.randn(3, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"meta.*cpu"):
        layer(torch.empty(3, 8, device="meta"))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\].*\(3, 7\)"):
        layer(torch.randn(3, 7))
    for rank in (0, -2, 1.5):
        with pytest.raises(ValueError, match="rank"):
            LoRALinear.from_linear(nn.Linear(8, 4), r=rank, lora_alpha=8)
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear.from_linear(nn.Embedding(4, 8), r=2, lora_alpha=4)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", 2, 4)


def test_state_dict_round_trip():
    layer = _layer(9, 7, 3, torch.float32, use_dora=True)
    state = layer.state_dict()
    assert {
        "weight",
        "bias",
        "adapters.default.lora_A",
        "adapters.default.lora_B",
        "adapters.default.magnitude",
    } <= set(state)
    other = _layer(9, 7, 3, torch.float32, use_dora=True, seed=1)
    x = torch.randn(4, 9)
    assert not torch.allclose(other(x), layer(x))
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), layer(x), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _layer(9, 7, 5, torch.float32, use_dora=True).load_state_dict(state)


def test_conv1d_is_transposed_and_remembered():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 10)  # weight [in=10, out=6]
    layer = LoRALinear.from_linear(conv, r=2, lora_alpha=4)
    assert layer.fan_in_fan_out and layer.weight.shape == (6, 10)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), conv(x))
    back = layer.to_dense_module()
    assert isinstance(back, Conv1D) and torch.equal(back.weight, conv.weight)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_unmerge_layer(variant):
    layer = _layer(12, 8, 4, torch.float32, use_dora=variant == "dora")
    original = layer.weight.detach().clone()
    x = torch.randn(5, 12)
    y = layer(x)
    layer.merge()
    assert layer.merged_adapter == "default"
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer.weight, original)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


def test_multiple_adapters_and_row_routing():
    layer = _layer(10, 6, 2, torch.float32)
    layer.add_adapter("verifier", 3, 6, variant="dora", init_lora_weights=False)
    with torch.no_grad():
        layer.adapters["verifier"].magnitude.mul_(1.3)
    x = torch.randn(3, 4, 10)
    outputs = {}
    for name in ("default", "verifier"):
        layer.set_adapter(name)
        outputs[name] = layer(x)
    layer.disabled = True
    outputs[None] = layer(x)
    layer.disabled = False
    model = nn.Sequential(layer)
    rows = ["verifier", None, "default"]
    with route_adapters(model, rows):
        routed = layer(x)
        with pytest.raises(ValueError, match=r"3 row adapters.*\(2, 4, 10\)"):
            layer(x[:2])
    for i, name in enumerate(rows):
        torch.testing.assert_close(routed[i], outputs[name][i], atol=1e-6, rtol=1e-6)
    layer.delete_adapter("default")
    assert list(layer.adapters) == ["verifier"] and layer.active_adapter == "verifier"
    with pytest.raises(ValueError, match="no adapter named 'default'"):
        layer.set_adapter("default")


@pytest.mark.triton
def test_fused_path_in_triton_interpreter():
    layer = _layer(32, 24, 4, torch.float32, use_dora=False)
    x = torch.randn(3, 32, requires_grad=True)
    y = layer(x)
    x64 = x.detach().double()
    torch.testing.assert_close(y.double(), _reference(layer, x64), atol=1e-4, rtol=1e-4)
    y.sum().backward()
    assert layer.lora_A.grad is not None and torch.isfinite(layer.lora_B.grad).all()
