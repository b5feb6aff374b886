"""Prefix attention: the op's Triton forward/backward (interpreter on CPU, real on GPU) and its torch
path (forward reference + the explicit backward formulas) against float64 autograd of the torch
reference, and the reference against SDPA over an explicitly concatenated K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastpeft.kernels.prefix_attention as pa
import fastpeft.kernels.prefix_attention_bwd as pa_bwd
from fastpeft.kernels.backend import force_backend
from fastpeft.kernels.prefix_attention import prefix_attention, prefix_attention_forward_reference

# (out atol, out rtol, grad atol, grad rtol)
TOL = {
    torch.float32: (1e-4, 1e-4, 2e-4, 1e-4),
    torch.float16: (5e-3, 5e-3, 1e-2, 1e-2),
    torch.bfloat16: (4e-2, 2e-2, 8e-2, 4e-2),
}


@pytest.fixture
def poisoned(monkeypatch):
    """Every launcher output starts NaN-filled, so an element the kernels forget to write shows up."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(pa, "empty_output", nan_empty)
    monkeypatch.setattr(pa_bwd, "empty_output", nan_empty)


def make_case(batch, h_q, h_kv, t_q, t_k, n_prefix, head_dim, dtype, prefix, pad, bias, device="cpu", seed=0):
    """Fresh random inputs; prefix in {None, "shared", "per_sample"}, pad in {None, "left", "right"}."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    case = {
        "q": rand(batch, h_q, t_q, head_dim),
        "k": rand(batch, h_kv, t_k, head_dim),
        "v": rand(batch, h_kv, t_k, head_dim),
    }
    if prefix is not None:
        shape = (n_prefix, h_kv, head_dim) if prefix == "shared" else (batch, n_prefix, h_kv, head_dim)
        case["prefix_k"], case["prefix_v"] = rand(*shape), rand(*shape)
    if bias:
        case["prefix_logit_bias"] = (torch.rand((), generator=g) * 2 - 1.5).to(device)
    mask = None
    if pad is not None:
        mask = torch.ones(batch, t_k, dtype=torch.bool, device=device)
        lengths = torch.randint(1, t_k, (batch,), generator=g)
        for b in range(batch):
            if pad == "left":
                mask[b, : lengths[b]] = False
            else:
                mask[b, t_k - lengths[b] :] = False
    return case, mask


def run_and_compare(case, mask, dtype):
    grad_out = torch.randn(case["q"].shape, generator=torch.Generator().manual_seed(1)).to(case["q"].device, dtype)
    leaves = {name: t.clone().requires_grad_() for name, t in case.items()}
    out = prefix_attention(**leaves, key_padding_mask=mask)
    out.backward(grad_out)
    ref_leaves = {name: t.detach().double().requires_grad_() for name, t in case.items()}
    ref_out, _ = prefix_attention_forward_reference(**ref_leaves, key_padding_mask=mask)
    ref_out.backward(grad_out.double())
    atol, rtol, gatol, grtol = TOL[dtype]
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    for name in case:
        got, want = leaves[name].grad, ref_leaves[name].grad
        assert got is not None and got.shape == case[name].shape, name
        assert not torch.isnan(got).any(), name
        # the bias gradient sums over every (row, prefix column): scale its tolerance with that count
        scale = max(1.0, want.abs().max().item()) if name == "prefix_logit_bias" else 1.0
        torch.testing.assert_close(
            got.double(), want, atol=gatol * scale, rtol=grtol, msg=lambda m, n=name: f"{n}: {m}"
        )
    return out


f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
TRITON_CASES = [
    # B, H_q, H_kv, T_q, T_k, P, D, dtype, prefix, pad, bias
    (2, 2, 2, 5, 5, 3, 16, f32, "shared", None, False),
    (2, 4, 2, 19, 19, 1, 16, f32, "per_sample", "left", False),  # P = 1, GQA 2
    (2, 4, 1, 17, 17, 3, 32, f32, "shared", "right", True),  # MQA
    (1, 8, 2, 9, 9, 2, 16, f32, "per_sample", "left", True),  # GQA 4
    (2, 2, 1, 7, 7, 3, 64, f32, "shared", None, True),
    (1, 2, 2, 6, 6, 3, 128, f32, "shared", "right", False),
    (2, 2, 2, 1, 9, 3, 16, f32, "shared", "left", False),  # decoding: T_q = 1 < T_k
    (2, 2, 2, 6, 11, 2, 16, f32, "per_sample", "right", False),  # chunked prefill
    (2, 2, 1, 11, 11, None, 16, f32, None, "left", False),  # no prefix: fully masked rows
    (2, 4, 2, 19, 19, 3, 16, f16, "shared", "left", True),
    (2, 4, 2, 19, 19, 3, 16, bf16, "per_sample", "right", True),
]


@pytest.mark.triton
@pytest.mark.parametrize("batch,h_q,h_kv,t_q,t_k,n_prefix,head_dim,dtype,prefix,pad,bias", TRITON_CASES)
def test_triton_matches_float64_reference(
    poisoned, batch, h_q, h_kv, t_q, t_k, n_prefix, head_dim, dtype, prefix, pad, bias
):
    case, mask = make_case(batch, h_q, h_kv, t_q, t_k, n_prefix, head_dim, dtype, prefix, pad, bias)
    run_and_compare(case, mask, dtype)


@pytest.mark.parametrize(
    "batch,h_q,h_kv,t_q,t_k,n_prefix,head_dim,dtype,prefix,pad,bias",
    [*TRITON_CASES, (2, 2, 1, 5, 5, 2, 48, f32, "shared", "left", True)],
)
def test_torch_path_matches_float64_reference(
    poisoned, batch, h_q, h_kv, t_q, t_k, n_prefix, head_dim, dtype, prefix, pad, bias
):
    """The CPU path of the op: any head_dim (48 has no kernel tile), outputs in the kernel's layouts."""
    case, mask = make_case(batch, h_q, h_kv, t_q, t_k, n_prefix, head_dim, dtype, prefix, pad, bias)
    out = run_and_compare(case, mask, dtype)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.triton
def test_fully_masked_rows_give_zero_not_nan(poisoned):
    """Without a prefix, a left-padded row sees no key: output 0, gradients 0, never NaN."""
    case, _ = make_case(2, 2, 2, 7, 7, None, 16, f32, None, None, False)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :4] = False
    mask[1, :] = False  # a sample that is all padding
    out = run_and_compare(case, mask, f32)
    assert out[0, :, :4].abs().max() == 0 and out[1].abs().max() == 0


@pytest.mark.triton
def test_strided_inputs_as_transformers_passes_them(poisoned):
    """q/k/v as transposed views of [B, T, H, D] projections, the prefix as a slice of a larger table."""
    q = torch.randn(2, 9, 4, 16).transpose(1, 2)
    k = torch.randn(2, 9, 2, 16).transpose(1, 2)
    v = torch.randn(2, 9, 2, 16).transpose(1, 2)
    table = torch.randn(3, 5, 2, 2, 16)  # [P, layers, k/v, H_kv, D]
    case = {"q": q, "k": k, "v": v, "prefix_k": table[:, 1, 0], "prefix_v": table[:, 1, 1]}
    run_and_compare(case, None, f32)


@pytest.mark.triton
def test_prefix_gradient_alone_when_the_sequence_is_frozen(poisoned):
    """A frozen first layer: q, k, v need no gradient (the dQ kernel is skipped), the prefix does."""
    case, mask = make_case(2, 4, 2, 9, 9, 3, 16, f32, "shared", "left", True)
    leaves = {n: t.clone().requires_grad_(n.startswith("prefix")) for n, t in case.items()}
    prefix_attention(**leaves, key_padding_mask=mask).square().sum().backward()
    ref = {n: t.double().requires_grad_(n.startswith("prefix")) for n, t in case.items()}
    prefix_attention_forward_reference(**ref, key_padding_mask=mask)[0].square().sum().backward()
    for name in ("prefix_k", "prefix_v", "prefix_logit_bias"):
        torch.testing.assert_close(leaves[name].grad.double(), ref[name].grad, atol=1e-4, rtol=1e-4)
    assert leaves["q"].grad is None


REFERENCE_CASES = [
    (2, 4, 2, 7, 7, 3, "shared", "left"),
    (1, 2, 1, 1, 6, 2, "per_sample", "right"),
    (2, 2, 2, 5, 8, 4, "per_sample", None),
]


@pytest.mark.parametrize("batch,h_q,h_kv,t_q,t_k,n_prefix,prefix,pad", REFERENCE_CASES)
def test_reference_matches_sdpa_on_concatenated_kv(batch, h_q, h_kv, t_q, t_k, n_prefix, prefix, pad):
    """What prefix tuning does today (prefix concatenated into K/V + boolean mask), in float64."""
    case, mask = make_case(batch, h_q, h_kv, t_q, t_k, n_prefix, 16, torch.float64, prefix, pad, False)
    out, lse = prefix_attention_forward_reference(**case, key_padding_mask=mask)
    group = h_q // h_kv
    pk = case["prefix_k"] if prefix == "per_sample" else case["prefix_k"].expand(batch, -1, -1, -1)
    pv = case["prefix_v"] if prefix == "per_sample" else case["prefix_v"].expand(batch, -1, -1, -1)
    keys = torch.cat([pk.transpose(1, 2), case["k"]], dim=2).repeat_interleave(group, 1)
    values = torch.cat([pv.transpose(1, 2), case["v"]], dim=2).repeat_interleave(group, 1)
    causal = torch.arange(t_k)[None, :] <= torch.arange(t_q)[:, None] + (t_k - t_q)
    seq = causal[None] & (mask[:, None, :] if mask is not None else torch.ones(batch, 1, t_k, dtype=torch.bool))
    allowed = torch.cat([torch.ones(batch, t_q, n_prefix, dtype=torch.bool), seq], dim=2)[:, None]
    want = F.scaled_dot_product_attention(case["q"], keys, values, attn_mask=allowed)
    torch.testing.assert_close(out, want)
    scores = (case["q"] @ keys.transpose(-1, -2)) / 4.0
    torch.testing.assert_close(lse, scores.masked_fill(~allowed, float("-inf")).logsumexp(-1).float())


def test_logit_bias_scales_the_prefix_share():
    """bias = log g multiplies the prefix's softmax mass by g; g = 0 is plain causal attention
    (right padding, so every row sees at least one sequence key)."""
    case, mask = make_case(2, 2, 2, 6, 6, 3, 16, torch.float64, "shared", "right", False)
    plain, _ = prefix_attention_forward_reference(case["q"], case["k"], case["v"], key_padding_mask=mask)

    def log(x):
        return torch.tensor(x, dtype=torch.float64).log()

    gated, _ = prefix_attention_forward_reference(**case, key_padding_mask=mask, prefix_logit_bias=log(0.0))
    torch.testing.assert_close(gated, plain)
    half, _ = prefix_attention_forward_reference(**case, key_padding_mask=mask, prefix_logit_bias=log(0.5))
    k2 = torch.cat([case["prefix_k"], case["prefix_k"]], 0)  # the prefix twice = its mass doubled
    v2 = torch.cat([case["prefix_v"], case["prefix_v"]], 0)
    double, _ = prefix_attention_forward_reference(case["q"], case["k"], case["v"], k2, v2, mask, log(0.25))
    torch.testing.assert_close(half, double)


def test_bad_arguments_raise_clear_errors():
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    pk = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        prefix_attention(q, torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16))
    with pytest.raises(ValueError, match=r"prefix_k must be \[P, 2, 16\]"):
        prefix_attention(q, k, v, torch.randn(3, 4, 16), torch.randn(3, 4, 16))
    with pytest.raises(ValueError, match="per-sample"):
        prefix_attention(q, k, v, torch.randn(3, 3, 2, 16), torch.randn(3, 3, 2, 16))
    with pytest.raises(TypeError, match=r"prefix_k is torch\.float16"):
        prefix_attention(q, k, v, pk.half(), pk.half())
    with pytest.raises(TypeError, match="bool"):
        prefix_attention(q, k, v, pk, pk, key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\[2, 5\]"):
        prefix_attention(q, k, v, pk, pk, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="without a prefix"):
        prefix_attention(q, k, v, prefix_logit_bias=torch.tensor(0.0))
    with pytest.raises(ValueError, match="last T_q"):
        prefix_attention(torch.randn(2, 4, 6, 16), k, v)
    with pytest.raises(ValueError, match="given together"):
        prefix_attention(q, k, v, pk, None)


@pytest.mark.triton
def test_kernel_rejects_unsupported_head_dim():
    q, k = torch.randn(1, 2, 4, 48), torch.randn(1, 2, 4, 48)
    with pytest.raises(ValueError, match="head_dim=48"):
        prefix_attention(q, k, k.clone())
    with pytest.raises(TypeError, match="float64"):
        pa.prefix_attention_forward(q.double(), k.double(), k.double())


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_register_spills(sm90):
    """No GPU in CI: compile the bf16, D=128 kernels for an H100 (ptxas ships with Triton) and check
    the chosen tiles do not spill registers to the stack."""
    pb = pa_bwd
    sizes = {"H_q", "H_kv", "T_q", "T_k", "P", "GROUP", "CAUSAL_OFFSET", "N_PREFIX_BLOCKS"}
    fp32 = {"LSE", "DELTA", "DPK", "DPV", "DBIAS_PART", "BIAS"}
    specs = []
    for phase, module, name in (
        ("fwd", "fastpeft.kernels.prefix_attention", "_prefix_attn_fwd_kernel"),
        ("dkdv", pb.__name__, "_prefix_attn_bwd_dkdv_kernel"),
        ("dq", pb.__name__, "_prefix_attn_bwd_dq_kernel"),
    ):
        fn = getattr(pa if phase == "fwd" else pb, name)
        cfg = pb.attention_launch_config(128, torch.device("cuda"), phase)
        const = {
            "HAS_PREFIX": True,
            "HAS_MASK": True,
            "HAS_BIAS": True,
            "HEAD_DIM": 128,
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "DOT_PRECISION": "tf32",
        }
        const = {k: v for k, v in const.items() if k in fn.arg_names}
        sig = {
            n: "constexpr"
            if n in const
            else "*fp32"
            if n in fp32
            else "*u8"
            if n == "KMASK"
            else "fp32"
            if n.endswith("scale")
            else "i32"
            if n in sizes or not n.isupper()
            else "*bf16"
            for n in fn.arg_names
        }
        specs.append(
            {
                "label": phase,
                "module": module,
                "kernel": name,
                "signature": sig,
                "constexprs": const,
                "num_warps": cfg.num_warps,
                "num_stages": cfg.num_stages,
            }
        )
    compiled = sm90(specs)
    assert {phase: c.stack for phase, c in compiled.items()} == {"fwd": 0, "dkdv": 0, "dq": 0}


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefix,pad", [("shared", "left"), ("per_sample", "right")])
def test_gpu_matches_float64_reference(poisoned, head_dim, dtype, prefix, pad):
    case, mask = make_case(2, 8, 2, 257, 257, 32, head_dim, dtype, prefix, pad, True, device="cuda")
    with force_backend("triton"):
        run_and_compare(case, mask, dtype)
