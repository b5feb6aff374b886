"""lora_linear (forward and dX, dA, dB, db) against float64 autograd, on both backends and regimes."""

import math

import pytest
import torch

import fastpeft.kernels.lora_linear as ll
from fastpeft.kernels.lora_linear import (
    DECODE_MAX_ROWS,
    check_lora_linear_args,
    lora_linear,
    lora_linear_training_backward,
    lora_linear_training_forward,
)
from fastpeft.kernels.nf4 import quantize_nf4
from fastpeft.kernels.nf4_dequantize import dequantize_nf4_reference
from fastpeft.kernels.workspace import clear_workspaces, get_workspace, workspace_bytes

# max |out - ref| <= TOL * max(1, max |ref|), per tensor; dA sums over M rows so its scale grows
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)
KINDS = ["dense", "nf4", "nf4_dq"]
# (M, N, K, r, blocksize); odd K / K not a multiple of the blocksize: rows straddle bytes and blocks
SHAPES = [(1, 37, 75, 4, 64), (3, 21, 96, 8, 32), (16, 70, 129, 16, 32), (17, 33, 99, 5, 64), (70, 48, 67, 12, 32)]
TRAIN_SHAPES = [s for s in SHAPES if s[0] > DECODE_MAX_ROWS]
DECODE_SHAPES = [s for s in SHAPES if s[0] <= DECODE_MAX_ROWS]


def make_case(m, n, k, r, blocksize, dtype, kind, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)
    a = (torch.randn(r, k, generator=gen) / math.sqrt(k)).to(dtype)
    b = (torch.randn(n, r, generator=gen) / math.sqrt(r)).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    if kind == "dense":
        weight, w64 = w, w.double()
    else:
        weight = quantize_nf4(w, blocksize=blocksize, double_quant=kind == "nf4_dq")
        w64 = dequantize_nf4_reference(weight, torch.float32).double()
    grad_y = torch.randn(m, n, generator=gen).to(dtype)
    return x, weight, bias, a, b, w64, grad_y


def reference64(x, w64, bias, a, b, scaling, grad_y):
    """Forward and (dX, dA, dB, db) by float64 autograd."""
    x, a, b = (t.detach().double().requires_grad_() for t in (x, a, b))
    bias = None if bias is None else bias.detach().double().requires_grad_()
    y = x @ w64.t() + scaling * (x @ a.t()) @ b.t()
    y = y if bias is None else y + bias
    y.backward(grad_y.double())
    return y.detach(), x.grad, a.grad, b.grad, None if bias is None else bias.grad


def assert_close64(out, ref, dtype, what=""):
    assert out is not None and out.shape == ref.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref).abs().max().item()
    bound = TOL[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def poison_dequant_workspace(n, k, dtype):
    get_workspace("nf4_dequant", n * k, dtype, torch.device("cpu")).fill_(float("nan"))


def run_and_check(shape, dtype, kind, with_bias, seed=0):
    m, n, k, r, blocksize = shape
    x, weight, bias, a, b, w64, grad_y = make_case(m, n, k, r, blocksize, dtype, kind, with_bias, seed)
    scaling = 2.0 / r
    ref = reference64(x, w64, bias, a, b, scaling, grad_y)
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    if bias is not None:
        bias.requires_grad_()
    poison_dequant_workspace(n, k, dtype)  # the training path must overwrite the reused buffer
    y = lora_linear(x, weight, bias, a, b, scaling)
    poison_dequant_workspace(n, k, dtype)  # ... and dequantize again in the backward
    y.backward(grad_y)
    got = (y, x.grad, a.grad, b.grad, None if bias is None else bias.grad)
    for name, out, want in zip(("y", "dX", "dA", "dB", "db"), got, ref):
        if want is None:
            assert out is None, name
        else:
            assert_close64(out, want, dtype, f"{name} {shape} {kind} bias={with_bias}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_torch_path_matches_float64(dtype, kind, with_bias):
    for seed, shape in enumerate(SHAPES):
        run_and_check(shape, dtype, kind, with_bias, seed)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_training_path_matches_float64(dtype, kind):
    for seed, shape in enumerate(TRAIN_SHAPES):
        for with_bias in (True, False):
            run_and_check(shape, dtype, kind, with_bias, seed)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4_dq"])
def test_triton_decode_path_matches_float64(dtype, kind):
    for seed, shape in enumerate(DECODE_SHAPES):
        run_and_check(shape, dtype, kind, with_bias=seed % 2 == 0, seed=seed)


@pytest.mark.triton
@pytest.mark.parametrize("m, regime", [(1, "decode"), (DECODE_MAX_ROWS, "decode"), (DECODE_MAX_ROWS + 1, "training")])
def test_dispatch_boundary(monkeypatch, m, regime):
    calls = []
    for name, tag in (("launch_nf4_lora_decode", "decode"), ("_training_forward", "training")):
        real = getattr(ll, name)
        monkeypatch.setattr(
            ll, name, lambda *args, _real=real, _tag=tag, **kw: calls.append(_tag) or _real(*args, **kw)
        )
    run_and_check((m, 40, 72, 8, 32), torch.float32, "nf4", with_bias=True, seed=m)
    assert calls == [regime]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 37])
def test_eager_function_equals_the_op_bit_for_bit(kind, m):
    """Eager calls take LoRALinearFn (no dispatcher); under the profiler (as in any trace) the op
    runs: the same bodies, so the same bits for y, dX, dA, dB and db."""
    x0, weight, bias0, a0, b0, _, grad_y = make_case(m, 29, 67, 5, 32, torch.float32, kind, True, seed=m)
    runs = {}
    for path in ("eager", "op"):
        x, bias, a, b = (t.clone().requires_grad_() for t in (x0, bias0, a0, b0))
        if path == "eager":
            y = lora_linear(x, weight, bias, a, b, 0.75)
        else:
            with torch.profiler.profile() as prof:
                y = lora_linear(x, weight, bias, a, b, 0.75)
            assert any(e.name.startswith("fastpeft::") for e in prof.events())
        assert (type(y.grad_fn).__name__ == "LoRALinearFnBackward") == (path == "eager")
        y.backward(grad_y)
        runs[path] = (y.detach(), x.grad, a.grad, b.grad, bias.grad)
    for name, eager, op in zip(("y", "dX", "dA", "dB", "db"), runs["eager"], runs["op"]):
        assert torch.equal(eager, op), name


@pytest.mark.triton
def test_training_forward_writes_out_and_returns_xa():
    x, weight, bias, a, b, w64, _ = make_case(20, 33, 99, 5, 64, torch.float16, "nf4_dq", True, seed=4)
    out = torch.full((20, 33), float("nan"), dtype=torch.float16)
    poison_dequant_workspace(33, 99, torch.float16)
    y, xa = lora_linear_training_forward(x, weight, bias, a, b, 0.5, out=out)
    assert y.data_ptr() == out.data_ptr()
    want = x.double() @ w64.t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t() + bias.double()
    assert_close64(y, want, torch.float16, "y")
    assert_close64(xa, x.double() @ a.double().t(), torch.float16, "xa")


@pytest.mark.triton
def test_training_backward_skips_unneeded_grads():
    x, weight, _bias, a, b, w64, grad_y = make_case(24, 30, 50, 4, 32, torch.float32, "nf4", False, seed=5)
    _, want_x, want_a, want_b, _ = reference64(x, w64, None, a, b, 0.5, grad_y)
    gx, ga, gb = lora_linear_training_backward(grad_y, x, None, weight, a, b, 0.5, needs=(False, True, True))
    assert gx is None
    assert_close64(ga, want_a, torch.float32, "dA")
    assert_close64(gb, want_b, torch.float32, "dB")
    x.requires_grad_()  # frozen adapter: only dX
    lora_linear(x, weight, None, a, b, 0.5).backward(grad_y)
    assert_close64(x.grad, want_x, torch.float32, "dX")


@pytest.mark.triton
def test_layers_share_one_dequant_workspace():
    clear_workspaces()
    m, n, k = 24, 64, 40  # n >= k so layer 2 can read the first k features of layer 1's output
    layers = [make_case(m, n, k, 4, 32, torch.bfloat16, "nf4", True, seed=s) for s in (1, 2)]
    x1, w1, bias1, a1, b1, w64_1, g = layers[0]
    _, w2, bias2, a2, b2, w64_2, _ = layers[1]
    x1.requires_grad_()
    h = lora_linear(x1, w1, bias1, a1, b1, 0.5)
    assert workspace_bytes() == n * k * 2  # one bf16 buffer, not one per layer
    y = lora_linear(h[:, :k], w2, bias2, a2, b2, 0.5)  # second layer overwrites the shared buffer
    assert workspace_bytes() == n * k * 2
    y.backward(g)  # the backward of layer 1 must dequantize its own W again
    h64 = x1.detach().double() @ w64_1.t() + 0.5 * (x1.detach().double() @ a1.double().t()) @ b1.double().t()
    h64 = (h64 + bias1.double()).requires_grad_()
    y64 = h64[:, :k] @ w64_2.t() + 0.5 * (h64[:, :k] @ a2.double().t()) @ b2.double().t()
    (dh,) = torch.autograd.grad(y64, h64, g.double())
    want_dx = dh @ w64_1 + 0.5 * (dh @ b1.double()) @ a1.double()
    assert_close64(x1.grad, want_dx, torch.bfloat16, "dX through two layers")


def test_workspace_made_under_inference_mode_serves_training_after():
    """Generation (inference_mode) first, then a training or no_grad forward on the same layer: the
    shared dequant buffer made in inference mode must stay writable outside it."""
    clear_workspaces()
    x, w, bias, a, b, w64, _ = make_case(7, 24, 40, 4, 32, torch.float32, "nf4", True, seed=3)
    with torch.inference_mode():
        first = lora_linear(x, w, bias, a, b, 0.5)
    with torch.no_grad():
        again = lora_linear(x, w, bias, a, b, 0.5)
    want = x.double() @ w64.t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t() + bias.double()
    assert_close64(first, want, torch.float32, "y under inference_mode")
    assert_close64(again, want, torch.float32, "y after it")


@pytest.mark.triton
@pytest.mark.parametrize("m", [5, 40])
def test_non_contiguous_inputs(m):
    shape = (m, 36, 80, 6, 32)
    x, weight, bias, a, b, w64, grad_y = make_case(*shape, torch.float32, "nf4", True, seed=m)
    ref = reference64(x, w64, bias, a, b, 0.75, grad_y)
    x_nc, a_nc, b_nc = (t.t().contiguous().t().requires_grad_() for t in (x, a, b))
    y = lora_linear(x_nc, weight, bias, a_nc, b_nc, 0.75)
    y.backward(grad_y.t().contiguous().t())
    for name, out, want in zip(("y", "dX", "dA", "dB"), (y, x_nc.grad, a_nc.grad, b_nc.grad), ref):
        assert_close64(out, want, torch.float32, name)


def _bad_inputs():
    x, w, bias, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6), torch.randn(2, 8), torch.randn(6, 2)
    meta = torch.device("meta")
    return [
        ((torch.randn(8), w, bias, a, b, 1.0), ValueError, r"x must be 2-D \[M, K\], got shape \(8,\)"),
        ((torch.randn(4, 7), w, bias, a, b, 1.0), ValueError, r"x has 7 features"),
        ((x, w, bias, torch.randn(2, 7), b, 1.0), ValueError, r"lora_A must be \[r, 8\], got \(2, 7\)"),
        ((x, w, bias, a, torch.randn(6, 3), 1.0), ValueError, r"lora_B must be \[6, 2\], got \(6, 3\)"),
        ((x, w, bias, torch.randn(0, 8), torch.randn(6, 0), 1.0), ValueError, r"rank must be >= 1"),
        ((x, w, torch.randn(5), a, b, 1.0), ValueError, r"bias must be a tensor of shape \[6\]"),
        ((x.half(), w, bias, a, b, 1.0), TypeError, r"x is torch.float16 but lora_A is torch.float32"),
        ((x, w.double(), bias, a, b, 1.0), TypeError, r"x is torch.float32 but weight is torch.float64"),
        ((x.long(), w, bias, a, b, 1.0), TypeError, r"x must be float32/float16/bfloat16, got torch.int64"),
        ((x, w, bias, a.to(meta), b, 1.0), ValueError, r"x is on cpu but lora_A is on meta"),
        ((x, w.to(meta), bias, a, b, 1.0), ValueError, r"x is on cpu but weight is on meta"),
        ((x, w, bias, a, b, "2"), TypeError, r"scaling must be a Python number"),
        ((x, w, bias, a, b, float("inf")), ValueError, r"scaling must be finite"),
        ((x, [[1.0]], bias, a, b, 1.0), TypeError, r"weight must be a torch.Tensor or NF4Weight, got list"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_is_rejected_with_a_clear_message(case):
    args, error, message = _bad_inputs()[case]
    with pytest.raises(error, match=message):
        lora_linear(*args)
    with pytest.raises(error, match=message):
        check_lora_linear_args(*args[:5], scaling=args[5])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [16, 17, 512])
def test_cuda_forward_and_grads(kind, m):
    """Both regimes on a GPU at a mid-size layer, bf16, against float64 autograd."""
    x, weight, bias, a, b, w64, grad_y = make_case(m, 1000, 1536, 16, 64, torch.bfloat16, kind, True, seed=m)
    x, bias, a, b, w64, grad_y = (t.cuda() for t in (x, bias, a, b, w64, grad_y))
    weight = weight.to("cuda")
    ref = reference64(x, w64, bias, a, b, 2.0, grad_y)
    x, a, b, bias = (t.clone().requires_grad_() for t in (x, a, b, bias))
    y = lora_linear(x, weight, bias, a, b, 2.0)
    y.backward(grad_y)
    for name, out, want in zip(("y", "dX", "dA", "dB", "db"), (y, x.grad, a.grad, b.grad, bias.grad), ref):
        assert_close64(out, want, torch.bfloat16, f"{name} m={m} {kind}")
