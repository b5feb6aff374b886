"""Shared-prefix (cascade) attention: the prompt part (Triton kernel in the interpreter, and the torch
reference) and its log-sum-exp merge with each row's own keys, against float64 softmax attention
over all keys, for many group sizes, prompt lengths, head sizes and masks."""

from __future__ import annotations

import math

import pytest
import torch

import fastpeft.kernels.prefix_attention_launch as pa_launch
from fastpeft.kernels.backend import force_backend
from fastpeft.kernels.cascade_attention import (
    cascade_config,
    cascade_prefix_attention,
    cascade_prefix_attention_reference,
    merge_attention_states,
)

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def poisoned(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(pa_launch, "empty_output", nan_empty)


def make_case(p, h, m, length, d, dtype, seed, masked="left"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(p, h, rows, d, generator=gen).to(dtype) for rows in (m, length, length))
    bias = torch.zeros(p, length)
    if masked == "left":  # left padding of various widths; the last prompt sees nothing at all
        for i in range(p):
            bias[i, : (i * length) // max(p, 2)] = float("-inf")
        if p > 1:
            bias[-1] = float("-inf")
    elif masked == "window":  # a sliding window, and a finite bias (a gate) on some keys
        bias[:, : length // 3] = float("-inf")
        bias[:, length // 3 :: 2] = math.log(0.5)
    return q, k, v, bias


def dense64(q, k, v, bias, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale + bias.double()[:, None, None, :]
    lse = torch.logsumexp(s, -1)
    probs = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # a row with no visible key: zeros
    return probs @ v.double(), lse


def assert_close(o, lse, want_o, want_lse, dtype):
    assert torch.isfinite(o).all()
    tol = TOL[dtype]
    assert (o.double() - want_o).abs().max().item() <= tol * max(1.0, want_o.abs().max().item())
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert (lse.double()[finite] - want_lse[finite]).abs().max().item() <= tol * 10


CASES = [
    (1, 1, 1, 1, 16),
    (2, 2, 3, 5, 16),
    (1, 4, 16, 17, 64),
    (3, 1, 17, 33, 40),
    (2, 2, 64, 16, 32),
    (1, 2, 70, 130, 64),
    (4, 1, 8, 64, 128),
]  # (P, H_kv, M = n·g rows, L, D)


@pytest.mark.triton
@pytest.mark.parametrize("masked", ["left", "window", None])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "P{}H{}M{}L{}D{}".format(*c))
def test_kernel_matches_float64(poisoned, case, masked):
    p, h, m, length, d = case
    q, k, v, bias = make_case(p, h, m, length, d, torch.float32, seed=sum(case), masked=masked)
    with force_backend("triton"), torch.no_grad():
        o, lse = cascade_prefix_attention(q, k, v, bias, d**-0.5)
    assert_close(o, lse, *dense64(q, k, v, bias, d**-0.5), torch.float32)


@pytest.mark.triton
def test_kernel_bf16_and_strided_inputs(poisoned):
    q, k, v, bias = make_case(2, 2, 12, 40, 64, torch.bfloat16, seed=7)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # [P, L, H, D] memory, as caches of other layouts
    with force_backend("triton"), torch.no_grad():
        o, lse = cascade_prefix_attention(q, k, v, bias, 0.125)
    assert_close(o, lse, *dense64(q, k, v, bias, 0.125), torch.bfloat16)


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "P{}H{}M{}L{}D{}".format(*c))
def test_reference_matches_float64(case):
    p, h, m, length, d = case
    q, k, v, bias = make_case(p, h, m, length, d, torch.float32, seed=sum(case))
    assert_close(*cascade_prefix_attention_reference(q, k, v, bias, 0.3), *dense64(q, k, v, bias, 0.3), torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("n,g,prompt,own", [(1, 1, 1, 1), (4, 2, 9, 3), (16, 1, 33, 5), (3, 4, 20, 17), (64, 1, 7, 2)])
def test_prefix_plus_own_keys_merged_equal_one_softmax(poisoned, n, g, prompt, own):
    """The sampler's split: n samples x g heads share the prompt KV; each row has its own keys."""
    gen = torch.Generator().manual_seed(n * 100 + own)
    d, p = 16, 2
    q = torch.randn(p, 1, n * g, d, generator=gen)
    pk, pv = torch.randn(p, 1, prompt, d, generator=gen), torch.randn(p, 1, prompt, d, generator=gen)
    ok, ov = torch.randn(p, 1, n * g, own, d, generator=gen), torch.randn(p, 1, n * g, own, d, generator=gen)
    bias = torch.zeros(p, prompt)
    bias[0, : prompt // 2] = float("-inf")
    with force_backend("triton"), torch.no_grad():
        o1, lse1 = cascade_prefix_attention(q, pk, pv, bias, 0.25)
    s2 = torch.einsum("phmd,phmjd->phmj", q, ok) * 0.25
    lse2 = torch.logsumexp(s2, -1)
    o2 = torch.einsum("phmj,phmjd->phmd", torch.softmax(s2, -1), ov)
    o, lse = merge_attention_states(o1, lse1, o2, lse2)
    # float64: every row's softmax over [its prompt keys | its own keys]
    keys = torch.cat(
        [pk.double().expand(p, 1, prompt, d)[:, :, None].expand(p, 1, n * g, prompt, d), ok.double()], dim=3
    )
    values = torch.cat([pv.double()[:, :, None].expand(p, 1, n * g, prompt, d), ov.double()], dim=3)
    s = torch.einsum("phmd,phmjd->phmj", q.double(), keys) * 0.25
    s[..., :prompt] += bias.double()[:, None, None, :]
    want = torch.einsum("phmj,phmjd->phmd", torch.softmax(s, -1), values)
    assert (o.double() - want).abs().max().item() <= 2e-5
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max().item() <= 2e-4


def test_merge_of_two_empty_parts_is_zero_not_nan():
    o = torch.randn(2, 3, 4)
    inf = torch.full((2, 3), float("-inf"))
    merged, lse = merge_attention_states(o, inf, o, inf)
    assert torch.equal(merged, torch.zeros_like(o)) and torch.isinf(lse).all()


def test_bad_arguments_are_clear_errors():
    q, k, v, bias = make_case(2, 1, 3, 5, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="bias must be"):
        cascade_prefix_attention(q, k, v, bias[:, :4], 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        cascade_prefix_attention(q, k[:1], v[:1], bias, 0.1)
    with pytest.raises(TypeError, match="one float dtype"):
        cascade_prefix_attention(q, k.double(), v, bias, 0.1)
    with pytest.raises(ValueError, match="inference only"):
        cascade_prefix_attention(q.requires_grad_(), k, v, bias, 0.1)


def test_one_program_reads_a_group_of_up_to_64_rows():
    assert cascade_config(64, torch.device("cuda"))["block_m"] == 64
    assert cascade_config(3, torch.device("cuda"))["block_m"] == 16


@pytest.mark.slow
def test_kernel_compiles_for_sm90_without_spills(sm90):
    import fastpeft.kernels.cascade_attention as ca

    fn = ca._cascade_prefix_kernel
    cfg = ca.cascade_config(64, torch.device("cuda"))
    const = {
        "HEAD_DIM": 128,
        "BLOCK_D": 128,
        "BLOCK_M": cfg["block_m"],
        "BLOCK_N": cfg["block_n"],
        "DOT_PRECISION": "tf32",
    }
    sig = {
        n: "constexpr"
        if n in const
        else "*fp32"
        if n in ("BIAS", "O", "LSE")
        else "*bf16"
        if n in "QKV"
        else "fp32"
        if n == "scale_log2"
        else "i32"
        for n in fn.arg_names
    }
    spec = {
        "label": "cascade",
        "module": ca.__name__,
        "kernel": fn.__name__,
        "signature": sig,
        "constexprs": const,
        "ones": ["stride_qd", "stride_kd", "stride_vd", "stride_bl", "stride_od", "stride_lm"],
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
    }
    got = sm90([spec])["cascade"]
    assert got.stack == 0 and not got.memory_ops["STL"]
