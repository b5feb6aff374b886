"""lora_linear_routed: each row through its own adapter, the base weight read once.

Rows must be bit for bit what the single-adapter op gives on the same batch (fp32), in every regime
(the CPU reference formula, the training path, the Triton decode kernel in the interpreter); outputs
and every gradient against float64; and a model under ``route_adapters`` equals separate runs exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastpeft.kernels.backend import force_backend
from fastpeft.kernels.lora_linear import lora_linear
from fastpeft.kernels.lora_linear_routed import lora_linear_routed
from fastpeft.kernels.nf4 import quantize_nf4
from fastpeft.kernels.nf4_dequantize import dequantize_nf4_reference

RANKS = (4, 8, 3)  # different ranks: the decode kernel pads them to one
SCALINGS = (2.0, 0.5, 1.25)


def make_case(m, n, k, kind, seed, bias=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    weight = w.to(dtype) if kind == "dense" else quantize_nf4(w.to(dtype), 32, double_quant=kind == "nf4_dq")
    w64 = w.to(dtype).double() if kind == "dense" else dequantize_nf4_reference(weight, torch.float32).double()
    lora_A = [(torch.randn(r, k, generator=gen) / math.sqrt(k)).to(dtype) for r in RANKS]
    lora_B = [(torch.randn(n, r, generator=gen) / math.sqrt(r)).to(dtype) for r in RANKS]
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    ids = torch.randint(-1, len(RANKS), (m,), generator=gen)
    ids[: min(m, len(RANKS) + 1)] = torch.arange(-1, len(RANKS))[: min(m, len(RANKS) + 1)]  # every adapter, and none
    return x, weight, w64, b, lora_A, lora_B, ids


def single_adapter_rows(x, weight, b, lora_A, lora_B, ids):
    """What the single-adapter op gives each row, on the whole batch with that row's adapter."""
    out = torch.empty(x.shape[0], lora_B[0].shape[0], dtype=x.dtype)
    zero_a, zero_b = torch.zeros_like(lora_A[0]), torch.zeros_like(lora_B[0])
    for a in range(-1, len(lora_A)):
        with torch.no_grad():
            y = lora_linear(x, weight, b, *((lora_A[a], lora_B[a], SCALINGS[a]) if a >= 0 else (zero_a, zero_b, 1.0)))
        out[ids == a] = y[ids == a]
    return out


def reference64(x, w64, b, lora_A, lora_B, ids, grad_y):
    x64 = x.double().requires_grad_()
    a64 = [t.double().requires_grad_() for t in lora_A]
    b64 = [t.double().requires_grad_() for t in lora_B]
    bias64 = None if b is None else b.double().requires_grad_()
    y = x64 @ w64.t()
    for a, (ta, tb, s) in enumerate(zip(a64, b64, SCALINGS)):
        y = y + (ids == a).double()[:, None] * (s * (x64 @ ta.t()) @ tb.t())
    y = y if bias64 is None else y + bias64
    y.backward(grad_y.double())
    return y.detach(), x64.grad, [t.grad for t in a64], [t.grad for t in b64], None if b is None else bias64.grad


def run(x, weight, b, lora_A, lora_B, ids, grad_y):
    x, *params = (t.clone().requires_grad_() for t in (x, *lora_A, *lora_B))
    lora_A, lora_B = params[: len(RANKS)], params[len(RANKS) :]
    bias = None if b is None else b.clone().requires_grad_()
    y = lora_linear_routed(x, weight, bias, ids, lora_A, lora_B, SCALINGS)
    y.backward(grad_y)
    return y.detach(), x.grad, [t.grad for t in lora_A], [t.grad for t in lora_B], None if b is None else bias.grad


def assert_matches64(got, want, tol):
    y, dx, da, db, dbias = got
    flat_got = [y, dx, *da, *db] + ([dbias] if dbias is not None else [])
    flat_want = [want[0], want[1], *want[2], *want[3]] + ([want[4]] if want[4] is not None else [])
    for i, (g, w) in enumerate(zip(flat_got, flat_want)):
        assert torch.isfinite(g).all(), i
        err = (g.double() - w).abs().max().item()
        assert err <= tol * max(1.0, w.abs().max().item()), (i, err)


@pytest.mark.parametrize("kind", ["dense", "nf4", "nf4_dq"])
@pytest.mark.parametrize("m", [1, 5, 17, 40])
def test_cpu_rows_bit_exact_with_single_adapter_and_grads_vs_float64(kind, m):
    x, weight, w64, b, lora_A, lora_B, ids = make_case(m, 48, 96, kind, seed=m)
    grad_y = torch.randn(m, 48, generator=torch.Generator().manual_seed(1))
    got = run(x, weight, b, lora_A, lora_B, ids, grad_y)
    assert torch.equal(got[0], single_adapter_rows(x, weight, b, lora_A, lora_B, ids))
    assert_matches64(got, reference64(x, w64, b, lora_A, lora_B, ids, grad_y), 2e-5)


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["dense", "nf4_dq"])
@pytest.mark.parametrize("m,n,k", [(1, 33, 64), (5, 40, 96), (16, 24, 75), (20, 33, 64)])
def test_triton_decode_kernel_rows_bit_exact_with_single_adapter(kind, m, n, k):
    """Interpreter: M <= 16 runs the decode kernel with the adapters stacked along r and row ids (K = 75:
    its general path); M = 20 the training path with the Triton dequantization."""
    x, weight, w64, b, lora_A, lora_B, ids = make_case(m, n, k, kind, seed=n + k)
    grad_y = torch.randn(m, n, generator=torch.Generator().manual_seed(2))
    with force_backend("triton"):
        got = run(x, weight, b, lora_A, lora_B, ids, grad_y)
        assert torch.equal(got[0], single_adapter_rows(x, weight, b, lora_A, lora_B, ids))
    assert_matches64(got, reference64(x, w64, b, lora_A, lora_B, ids, grad_y), 2e-5)


@pytest.mark.triton
def test_triton_decode_kernel_bf16_vs_float64():
    x, weight, w64, b, lora_A, lora_B, ids = make_case(7, 64, 128, "nf4_dq", seed=3, dtype=torch.bfloat16)
    with force_backend("triton"), torch.no_grad():
        y = lora_linear_routed(x, weight, b, ids, lora_A, lora_B, SCALINGS)
    w64 = dequantize_nf4_reference(weight, torch.bfloat16).double()  # W rounded to bf16, as the op does
    want = reference64(x, w64, b, lora_A, lora_B, ids, torch.zeros(7, 64))[0]
    assert (y.double() - want).abs().max().item() <= 1.6e-2 * max(1.0, want.abs().max().item())


def test_bad_arguments_are_clear_errors():
    x, weight, _, b, lora_A, lora_B, ids = make_case(4, 16, 32, "dense", seed=0)
    with pytest.raises(ValueError, match=r"row_adapters must be in \[-1, 3\)"):
        lora_linear_routed(x, weight, b, torch.tensor([0, 1, 3, -1]), lora_A, lora_B, SCALINGS)
    with pytest.raises(ValueError, match="one lora_A, lora_B and scaling per adapter"):
        lora_linear_routed(x, weight, b, ids, lora_A, lora_B[:2], SCALINGS)
    with pytest.raises(TypeError, match="int32/int64"):
        lora_linear_routed(x, weight, b, ids.float(), lora_A, lora_B, SCALINGS)
    with pytest.raises(ValueError, match=r"row_adapters must be \[4\]"):
        lora_linear_routed(x, weight, b, ids[:3], lora_A, lora_B, SCALINGS)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear_routed(x, weight, b, ids, [lora_A[0][:, :5], *lora_A[1:]], lora_B, SCALINGS)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_model_under_route_adapters_equals_separate_runs_exactly(quantize):
    """fp32 Llama, three plain LoRA adapters: each routed row is bit for bit that adapter's own run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastpeft

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval()
    names = ["policy", "critic", "judge"]
    for i, name in enumerate(names):
        cfg = fastpeft.LoraConfig(
            r=4 + 2 * i, lora_alpha=8, target_modules="all-linear", quantize=quantize, init_lora_weights=False
        )
        fastpeft.inject(model, cfg, adapter_name=name)
    ids = torch.randint(0, 101, (5, 7), generator=torch.Generator().manual_seed(0))
    separate = {}
    with torch.no_grad():
        for name in names:
            fastpeft.set_adapter(model, name)
            separate[name] = model(ids).logits
        rows = ["critic", "judge", "policy", "critic", "judge"]
        with fastpeft.route_adapters(model, rows):
            routed = model(ids).logits
    for i, name in enumerate(rows):
        assert torch.equal(routed[i], separate[name][i]), (i, name)


def test_other_variants_keep_the_group_path():
    """A DoRA adapter among the routed ones: the layer falls back to per-group contributions."""
    from fastpeft.lifecycle import route_adapters
    from fastpeft.lora_linear import LoRALinear

    layer = LoRALinear.from_linear(nn.Linear(12, 10), 3, 6, init_lora_weights=False)
    layer.add_adapter("dora", 2, 4, variant="dora", init_lora_weights=False)
    x = torch.randn(2, 12)
    want = {}
    for name in ("default", "dora"):
        layer.set_adapter(name)
        want[name] = layer(x)
    with route_adapters(nn.Sequential(layer), ["dora", "default"]):
        got = layer(x)
    torch.testing.assert_close(got[0], want["dora"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want["default"][1], atol=1e-6, rtol=1e-6)


def test_compiles_without_graph_breaks_and_matches_eager():
    """fastpeft::lora_linear_routed under torch.compile (fullgraph, AOTAutograd): forward and every gradient."""
    x, weight, _, b, lora_A, lora_B, ids = make_case(9, 24, 64, "nf4_dq", seed=4)
    grad_y = torch.randn(9, 24, generator=torch.Generator().manual_seed(3))
    want = run(x, weight, b, lora_A, lora_B, ids, grad_y)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: lora_linear_routed(*args), backend="aot_eager", fullgraph=True)
    xg, *params = (t.clone().requires_grad_() for t in (x, *lora_A, *lora_B))
    y = compiled(xg, weight, b, ids, params[:3], params[3:], SCALINGS)
    y.backward(grad_y)
    got = [y.detach(), xg.grad, *(p.grad for p in params)]
    for g, w in zip(got, [want[0], want[1], *want[2], *want[3]], strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
