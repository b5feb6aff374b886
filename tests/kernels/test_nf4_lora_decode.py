"""The decode-regime fused kernel (M <= 16) against a float64 reference, in the Triton interpreter."""

import math

import pytest
import torch

from fastpeft.kernels.nf4 import quantize_nf4
from fastpeft.kernels.nf4_dequantize import dequantize_nf4_reference
from fastpeft.kernels.nf4_lora_decode import DECODE_MAX_ROWS, nf4_lora_decode, nf4_lora_decode_reference
from fastpeft.kernels.workspace import get_workspace

# max |out - ref| <= TOL * max(1, max |ref|); bf16/fp16 also carry W rounded to their precision
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)
KINDS = ["dense", "nf4", "nf4_dq"]
# (M, N, K, r, blocksize): odd K so rows straddle bytes, K not a multiple of the blocksize so rows
# straddle absmax blocks; 70 x 129 / 32 = 283 blocks spans two double-quant groups of 256.
SHAPES = [(1, 37, 75, 4, 64), (3, 70, 129, 20, 32), (16, 33, 96, 16, 32)]


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
    return x, weight, bias, a, b, w64


def reference64(x, w64, bias, a, b, scaling):
    y = x.double() @ w64.t() + scaling * (x.double() @ a.double().t()) @ b.double().t()
    return y if bias is None else y + bias.double()


def assert_close64(out, ref, dtype, what=""):
    assert out.shape == ref.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    err = (out.double() - ref).abs().max().item()
    bound = TOL[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_decode_kernel_matches_float64(dtype, kind):
    for i, (m, n, k, r, blocksize) in enumerate(SHAPES):
        for with_bias, split_k in ((True, 1), (False, None), (True, 3)):
            x, weight, bias, a, b, w64 = make_case(m, n, k, r, blocksize, dtype, kind, with_bias, seed=i)
            scaling = 2.0 / r
            out = torch.full((m, n), float("nan"), dtype=dtype)
            y = nf4_lora_decode(x, weight, bias, a, b, scaling, out=out, split_k=split_k)
            assert y is out
            assert_close64(y, reference64(x, w64, bias, a, b, scaling), dtype, f"{(m, n, k, r)} split={split_k}")


@pytest.mark.triton
def test_decode_split_k_workspace_is_left_zero():
    x, weight, bias, a, b, w64 = make_case(16, 70, 129, 8, 32, torch.float32, "nf4_dq", True, seed=7)
    for split_k in (2, 4):
        y = nf4_lora_decode(x, weight, bias, a, b, 0.5, split_k=split_k)
        assert_close64(y, reference64(x, w64, bias, a, b, 0.5), torch.float32, f"split={split_k}")
        acc = get_workspace("lora_decode_acc", DECODE_MAX_ROWS * 70, torch.float32, x.device, zeroed=True)
        count = get_workspace("lora_decode_count", 3, torch.int32, x.device, zeroed=True)
        assert not acc.any() and not count.any(), "split-K workspace must be reset for the next call"


@pytest.mark.triton
def test_decode_non_contiguous_inputs_and_tiles():
    x, weight, bias, a, b, w64 = make_case(5, 45, 80, 6, 64, torch.float16, "dense", True, seed=3)
    ref = reference64(x, w64, bias, a, b, 1.5)
    x_nc = x.t().contiguous().t()  # column-major view, same values
    a_nc = a.t().contiguous().t()
    b_nc = b.t().contiguous().t()
    w_nc = weight.t().contiguous().t()
    assert not (x_nc.is_contiguous() or a_nc.is_contiguous() or b_nc.is_contiguous() or w_nc.is_contiguous())
    y = nf4_lora_decode(x_nc, w_nc, bias, a_nc, b_nc, 1.5, block_n=16, block_k=64, split_k=2)
    assert_close64(y, ref, torch.float16, "non-contiguous")


@pytest.mark.triton
@pytest.mark.parametrize("r", [1, 33])
def test_decode_odd_ranks(r):
    x, weight, bias, a, b, w64 = make_case(2, 40, 72, r, 32, torch.float32, "nf4", False, seed=r)
    y = nf4_lora_decode(x, weight, bias, a, b, 1.0 / math.sqrt(r))
    assert_close64(y, reference64(x, w64, bias, a, b, 1.0 / math.sqrt(r)), torch.float32, f"r={r}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_decode_reference_matches_float64(dtype, kind):
    x, weight, bias, a, b, w64 = make_case(3, 70, 129, 8, 32, dtype, kind, True, seed=11)
    y = nf4_lora_decode_reference(x, weight, bias, a, b, 0.25)
    assert_close64(y, reference64(x, w64, bias, a, b, 0.25), dtype, "reference")


@pytest.mark.triton
def test_decode_empty_batch():
    x, weight, bias, a, b, _ = make_case(1, 20, 40, 4, 32, torch.float32, "nf4", True, seed=0)
    assert nf4_lora_decode(x[:0], weight, bias, a, b, 1.0).shape == (0, 20)


def test_decode_rejects_bad_input():
    x, weight, bias, a, b, _ = make_case(16, 20, 40, 4, 32, torch.float32, "nf4", True, seed=0)
    with pytest.raises(ValueError, match="at most 16 rows"):
        nf4_lora_decode(torch.cat([x, x[:1]]), weight, bias, a, b, 1.0)
    with pytest.raises(ValueError, match=r"out must be torch.float32 \[16, 20\]"):
        nf4_lora_decode(x, weight, bias, a, b, 1.0, out=torch.empty(16, 21))
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        nf4_lora_decode(x, weight, bias, a, b, 1.0, block_n=24)
    with pytest.raises(ValueError, match=r"lora_B must be \[20, 4\]"):
        nf4_lora_decode(x, weight, bias, a, b.t(), 1.0)
    with pytest.raises(TypeError, match="scaling must be a Python number"):
        nf4_lora_decode(x, weight, bias, a, b, torch.tensor(1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [1, 16])
def test_decode_cuda_llama_shapes(m, n, k):
    """Real decode shapes on a GPU (double-quant NF4, bf16, r=16); also a second call, which
    relies on the split-K workspace having been reset by the first."""
    x, weight, bias, a, b, w64 = make_case(m, n, k, 16, 64, torch.bfloat16, "nf4_dq", True, seed=m)
    x, bias, a, b, w64 = (t.cuda() for t in (x, bias, a, b, w64))
    weight = weight.to("cuda")
    ref = reference64(x, w64, bias, a, b, 2.0)
    for _ in range(2):
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        assert_close64(nf4_lora_decode(x, weight, bias, a, b, 2.0, out=out), ref, torch.bfloat16, f"{m}x{n}x{k}")


@pytest.mark.triton
@pytest.mark.parametrize(
    "n,k,blocksize,double_quant",
    [
        (33, 64, 32, False),
        (40, 128, 64, True),
        (21, 256, 256, True),
        (64, 96, 32, True),
        (17, 75, 64, True),
        (8, 512, 128, False),
    ],
)
def test_decode_dequantizes_bit_exact_with_reference(n, k, blocksize, double_quant):
    """The weight the kernel multiplies by, read back exactly: one-hot rows x = e_k (fp32, ieee dots)
    and B = 0 make y[m] = W[:, k_m], which must equal the reference dequantization bit for bit, on
    the aligned path (vector loads; K a multiple of the blocksize, one or several blocks per K step)
    and the general one (K = 75), with split-K (other slices add exact zeros)."""
    gen = torch.Generator().manual_seed(n * k)
    q = quantize_nf4(torch.randn(n, k, generator=gen) * 3, blocksize, double_quant)
    w = dequantize_nf4_reference(q, torch.float32)
    cols = torch.randperm(k, generator=gen)[:DECODE_MAX_ROWS]
    x = torch.zeros(len(cols), k)
    x[torch.arange(len(cols)), cols] = 1.0
    a, b = torch.randn(4, k, generator=gen), torch.zeros(n, 4)
    for split_k in (1, 3):
        y = nf4_lora_decode(x, q, None, a, b, 1.0, split_k=split_k)
        assert torch.equal(y, w[:, cols].t()), split_k
