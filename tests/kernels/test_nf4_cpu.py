"""The CPU NF4 path (kernels/nf4_cpu.py): dequantization bit-exact with the reference on both of its
implementations (bitsandbytes' native kernel on one-block rows, and the byte-pair table), the guard
against bitsandbytes' per-row scale lookup, and x·Wᵀ (GEMM and bitsandbytes' GEMV) vs float64."""

import copy
import itertools
import math
import zlib

import pytest
import torch

import fastpeft.kernels.nf4_cpu as nc
from fastpeft.kernels.lora_linear import lora_linear
from fastpeft.kernels.nf4 import NF4Weight, quantize_nf4
from fastpeft.kernels.nf4_dequantize import dequantize_nf4, dequantize_nf4_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (64, 64) / 128, (4, 96) / 64, (33, 80) / 64: where bitsandbytes' own CPU dequantize is wrong
CASES = [
    ((64, 64), 128),
    ((4, 96), 64),
    ((33, 80), 64),
    ((10, 48), 32),
    ((37, 53), 64),
    ((1, 1), 32),
    ((300, 257), 32),
    ((3, 4, 64), 256),
    ((16, 256), 1024),
    ((5, 4096), 4096),
    ((7, 2048), 2048),
]


def weight(shape, blocksize, double_quant, seed_text):
    gen = torch.Generator().manual_seed(zlib.crc32(seed_text.encode()))
    n = math.prod(shape)
    w = torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 4 - 2)  # scales 1e-2..1e2
    return quantize_nf4(w.reshape(shape), blocksize, double_quant)


@pytest.fixture(params=["native", "table"])
def implementation(request, monkeypatch):
    """Run each test on bitsandbytes' native kernels and on the table path (native() with nothing)."""
    if request.param == "native":
        if not nc.native().nf4:
            pytest.skip("bitsandbytes' CPU library is not installed here")
    else:
        monkeypatch.setattr(nc, "native", lambda: nc._Native({}, None, None))
    return request.param


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", CASES)
def test_dequantize_bit_exact_with_reference(implementation, shape, blocksize, double_quant):
    q = weight(shape, blocksize, double_quant, f"{shape}{blocksize}{double_quant}")
    for dtype in DTYPES:
        want = dequantize_nf4_reference(q, dtype)
        out = torch.full(q.shape, float("nan"), dtype=dtype)
        assert dequantize_nf4(q, dtype, out=out) is out
        assert torch.equal(out, want), (shape, blocksize, dtype)
        assert torch.equal(nc.dequantize_nf4_cpu(q, dtype), want)


def test_table_path_chunks_and_partial_block(monkeypatch):
    """Chunks smaller than the weight, a chunk boundary inside nothing but whole blocks, and a
    trailing partial block with an odd element count."""
    monkeypatch.setattr(nc, "native", lambda: nc._Native({}, None, None))
    monkeypatch.setattr(nc, "_TABLE_CHUNK", 200)  # -> 192-element chunks at blocksize 64
    q = weight((7, 141), 64, True, "chunks")
    assert torch.equal(nc.dequantize_nf4_cpu(q, torch.float32), dequantize_nf4_reference(q, torch.float32))


def test_native_kernel_is_called_with_one_block_per_row():
    """bitsandbytes' kernel looks a scale up per row (row·cols/blocksize + col/blocksize): called with
    the weight's shape it is wrong when cols is not a multiple of the blocksize, with one-block rows
    it is right. This pins the reason for the guard, on bitsandbytes' own kernel."""
    fn = nc.native().nf4.get(torch.float32)
    if fn is None:
        pytest.skip("bitsandbytes' CPU library is not installed here")
    q = weight((64, 64), 128, False, "guard")
    want = dequantize_nf4_reference(q, torch.float32)
    as_shape = torch.empty(64, 64)
    fn(nc._c_ptr(q.packed.data_ptr()), nc._c_ptr(q.absmax.data_ptr()), nc._c_ptr(as_shape.data_ptr()), 128, 64, 64)
    one_block = torch.empty(64, 64)
    nc._dequant_native_blocks(fn, q.packed, q.absmax, one_block.view(-1), 128, q.numel)
    assert not torch.equal(as_shape, want)  # bitsandbytes' call: wrong scales
    assert torch.equal(one_block, want)


def test_double_quant_scales_bit_exact():
    q = weight((300, 257), 32, True, "nested")  # 10 nested blocks, the last partial
    assert torch.equal(nc.absmax_fp32_cpu(q), q.absmax_fp32())


# ----------------------------------------------------------------------------------------------
# x·Wᵀ


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("m", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("n,k,blocksize", [(64, 128, 64), (96, 192, 32), (40, 128, 64), (64, 100, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_float64(m, n, k, blocksize, dtype):
    q = weight((n, k), blocksize, True, f"lin{m}{n}{k}")
    gen = torch.Generator().manual_seed(m * 31 + n)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    w64 = dequantize_nf4_reference(q, torch.float32).double()
    want = x.double() @ w64.t() + bias.double()
    nc.get_workspace("nf4_dequant", n * k, dtype, torch.device("cpu")).fill_(float("nan"))
    got = nc.nf4_linear_cpu(x, q, bias)
    assert got.dtype == dtype and got.shape == (m, n) and torch.isfinite(got).all()
    gemv = nc.gemv_applicable(x, q)
    assert gemv == (
        dtype == torch.bfloat16
        and m <= nc.GEMV_MAX_ROWS
        and n % 32 == 0
        and k % blocksize == 0
        and nc.native().gemv_bf16 is not None
    )
    assert rel_err(got, want) <= (3e-7 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("m", [1, 4, 8, 16])
def test_linear_error_no_worse_than_bitsandbytes(m):
    """bf16, a decode-sized shape: our relative error against float64 (of the exact NF4 weight) is at
    most bitsandbytes + PEFT's Linear4bit in eval mode on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(m)
    n, k = 256, 512
    w = torch.randn(n, k, generator=gen) / k**0.5
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.bfloat16(), requires_grad=False, quant_type="nf4", blocksize=64)
    layer = layer.to("cpu").eval()
    q = NF4Weight.from_bnb(layer.weight)
    q = NF4Weight(
        **{**q.tensors(), "packed": q.packed.clone(), "absmax": q.absmax.clone()},
        shape=q.shape,
        blocksize=q.blocksize,
        dtype=q.dtype,
    )
    x = torch.randn(m, k, generator=gen).bfloat16()
    want = x.double() @ dequantize_nf4_reference(q, torch.float32).double().t()
    with torch.no_grad():
        theirs = layer(x)
    ours = nc.nf4_linear_cpu(x, q)
    assert rel_err(ours, want) <= 1.05 * rel_err(theirs, want) + 1e-6


def test_gemv_layout_equals_bitsandbytes_repack():
    bf = pytest.importorskip("bitsandbytes.functional")
    if nc.native().gemv_bf16 is None:
        pytest.skip("no AVX512-BF16 GEMV here")
    q = weight((64, 256), 64, True, "repack")
    packed, state = q.to_bnb()
    state = copy.deepcopy(state)
    state.dtype = torch.bfloat16
    theirs, theirs_state = bf._convert_weight_packed_for_cpu(packed.clone(), state)
    packed_cpu, absmax_cpu = nc._gemv_layout(q, nc.native())
    assert torch.equal(packed_cpu, theirs)
    assert torch.equal(absmax_cpu, theirs_state.absmax)


def test_derived_cache_follows_the_weight():
    """The cached fp32 scales and GEMV copy are rebuilt when the weight is written in place, and
    dropped once it is freed."""
    q = weight((64, 128), 64, True, "cache")
    x = torch.randn(2, 128).bfloat16()
    first = nc.nf4_linear_cpu(x, q)
    assert torch.equal(nc.absmax_fp32_cpu(q), q.absmax_fp32())
    entry = nc._derived[nc._weight_key(q)]
    assert entry.absmax is not None and (entry.gemv is not None) == (nc.native().gemv_bf16 is not None)
    other = weight((64, 128), 64, True, "other")
    for name, t in q.tensors().items():
        t.copy_(other.tensors()[name])  # written in place: new versions
    want = x.double() @ dequantize_nf4_reference(q, torch.float32).double().t()
    second = nc.nf4_linear_cpu(x, q)
    assert not torch.equal(first, second) and rel_err(second, want) <= 8e-3
    assert torch.equal(nc.absmax_fp32_cpu(q), q.absmax_fp32())
    del q, entry
    third = weight((64, 128), 64, True, "third")
    nc.absmax_fp32_cpu(third)  # a miss sweeps freed weights' entries (third may reuse q's address)
    assert all(not r.expired() for entry in nc._derived.values() for r in entry.source)
    nc.clear_derived()
    assert not nc._derived


@pytest.mark.parametrize("m,dtype", list(itertools.product([2, 24], [torch.float32, torch.bfloat16])))
def test_qlora_linear_op_on_cpu_takes_this_path_with_gradients(m, dtype):
    """lora_linear on a CPU NF4 weight (the torch backend): forward and dX, dA, dB vs float64."""
    q = weight((64, 128), 64, True, f"op{m}")
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 128, generator=gen).to(dtype).requires_grad_()
    a = (torch.randn(4, 128, generator=gen) / 10).to(dtype).requires_grad_()
    b = (torch.randn(64, 4, generator=gen) / 2).to(dtype).requires_grad_()
    y = lora_linear(x, q, None, a, b, 0.5)
    g = torch.randn(m, 64, generator=gen).to(dtype)
    y.backward(g)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ dequantize_nf4_reference(q, torch.float32).double().t() + 0.5 * (x64 @ a64.t()) @ b64.t()
    y64.backward(g.double())
    tol = 1e-6 if dtype == torch.float32 else 1.2e-2
    for got, want in ((y, y64), (x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert rel_err(got, want.detach()) <= tol
