"""The ``fastpeft::`` custom ops: torch.library.opcheck on both backends, fake tensors, tracing.

opcheck runs each op for real and checks its schema (aliasing, mutation), its autograd
registration, that its fake implementation gives the real outputs' shapes, dtypes and strides, and
that AOTAutograd (what torch.compile runs) traces it with dynamic shapes and matches eager.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fastpeft.kernels import dequantize_nf4, force_backend, nf4, nf4_dequantize, quantize_nf4
from fastpeft.kernels.cascade_attention import cascade_prefix_attention
from fastpeft.kernels.linear_cross_entropy import linear_cross_entropy
from fastpeft.kernels.linear_logprobs import linear_logprobs
from fastpeft.kernels.lora_linear import lora_linear
from fastpeft.kernels.lora_linear_inputs import weight_op_args
from fastpeft.kernels.lora_linear_routed import lora_linear_routed
from fastpeft.kernels.nf4_lora_decode import nf4_lora_decode
from fastpeft.kernels.prefix_attention import prefix_attention
from fastpeft.kernels.workspace import clear_workspaces, workspace_bytes

OPS = {
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_nf4_out",
    "lora_linear",
    "nf4_lora_linear",
    "lora_linear_backward",
    "nf4_lora_decode",
    "prefix_attention",
    "prefix_attention_backward",
    "linear_cross_entropy",
    "linear_logprobs",
    "linear_logprobs_backward",
    "lora_linear_routed",
    "lora_linear_routed_backward",
    "cascade_prefix_attention",
}


def _rand(gen, *shape, grad=False):
    return torch.randn(*shape, generator=gen).requires_grad_(grad)


def op_cases(kind: str):
    """(op, args) per case, fresh random inputs; ``kind`` "all" or "triton" (ops with a Triton kernel)."""
    gen = torch.Generator().manual_seed(0)
    ops = torch.ops.fastpeft
    q_dq = quantize_nf4(_rand(gen, 20, 40), 32, double_quant=True)
    q = quantize_nf4(_rand(gen, 20, 40), 32, double_quant=False)
    x, xs = _rand(gen, 24, 40, grad=True), _rand(gen, 3, 40, grad=True)  # training / decode rows
    a, b, bias = _rand(gen, 4, 40, grad=True), _rand(gen, 20, 4, grad=True), _rand(gen, 20, grad=True)
    a2, b2 = _rand(gen, 2, 40, grad=True), _rand(gen, 20, 2, grad=True)  # a second adapter, rank 2
    ids = torch.tensor([1, -1, 0] + [0, 1, -1, 1] * 5 + [0])  # routed rows: an adapter index or -1
    q4, k4, v4 = (
        _rand(gen, 2, 4, 5, 16, grad=True),
        _rand(gen, 2, 2, 5, 16, grad=True),
        _rand(gen, 2, 2, 5, 16, grad=True),
    )
    pk, pv = _rand(gen, 3, 2, 16, grad=True), _rand(gen, 3, 2, 16, grad=True)
    mask = torch.tensor([[True] * 5, [False, True, True, True, True]])
    gate = torch.tensor(-0.3, requires_grad=True)
    attn = (q4, k4, v4, pk, pv, mask, gate, 0.25)
    out, lse = ops.prefix_attention(*(t.detach() if isinstance(t, torch.Tensor) else t for t in attn))
    detached = [t.detach() for t in (q4, k4, v4, pk, pv)]
    cases = {
        "dequantize_nf4": (ops.dequantize_nf4, (*q_dq.op_args(), [20, 40], 32, torch.bfloat16)),
        "dequantize_nf4_out": (ops.dequantize_nf4_out, (*q.op_args(), 32, torch.empty(20, 40))),
        "nf4_lora_linear": (ops.nf4_lora_linear, (x, *weight_op_args(q_dq), bias, a, b, 0.5, True)),
        "nf4_lora_linear decode rows": (ops.nf4_lora_linear, (xs, *weight_op_args(q), bias, a, b, 0.5, True)),
        "lora_linear": (ops.lora_linear, (x, _rand(gen, 20, 40), None, a, b, 0.5, True)),
        "lora_linear decode rows": (ops.lora_linear, (xs, _rand(gen, 20, 40), bias, a, b, 0.5, False)),
        "lora_linear_backward": (
            ops.lora_linear_backward,
            (
                _rand(gen, 24, 20),
                x.detach(),
                _rand(gen, 24, 4),
                *weight_op_args(q_dq),
                a.detach(),
                b.detach(),
                0.5,
                True,
                True,
                True,
            ),
        ),
        "nf4_lora_decode": (
            ops.nf4_lora_decode,
            (xs.detach(), *weight_op_args(q_dq), None, a.detach(), b.detach(), 0.5, 0, 0, 0, torch.empty(3, 20)),
        ),
        "prefix_attention": (ops.prefix_attention, attn),
        "prefix_attention_backward": (
            ops.prefix_attention_backward,
            (_rand(gen, 2, 4, 5, 16), *detached, mask, gate.detach(), out, lse, 0.25, True, True),
        ),
        "cascade_prefix_attention": (
            ops.cascade_prefix_attention,
            (
                _rand(gen, 2, 2, 6, 16),
                _rand(gen, 2, 2, 5, 16),
                _rand(gen, 2, 2, 5, 16),
                torch.tensor([[0.0] * 5, [-math.inf, 0, 0, 0, 0]]),
                0.25,
            ),
        ),
        "lora_linear_routed": (
            ops.lora_linear_routed,
            (x, *weight_op_args(q_dq), bias, ids, [a, a2], [b, b2], [0.5, 2.0], True),
        ),
        "lora_linear_routed decode rows": (
            ops.lora_linear_routed,
            (xs, *weight_op_args(q), None, ids[:3], [a, a2], [b, b2], [0.5, 2.0], False),
        ),
        "lora_linear_routed_backward": (
            ops.lora_linear_routed_backward,
            (
                _rand(gen, 24, 20),
                x.detach(),
                _rand(gen, 24, 6),
                *weight_op_args(q_dq),
                ids,
                [a.detach(), a2.detach()],
                [b.detach(), b2.detach()],
                [0.5, 2.0],
                True,
                True,
                True,
            ),
        ),
    }
    # LM-head log-probs: 9 rows, V = 13 over chunks of 4; the backward with and without the entropy term
    h9, w13, t9 = _rand(gen, 9, 8, grad=True), _rand(gen, 13, 8, grad=True), torch.tensor([1, 4, 0, 12, 3, 7, 2, 5, 9])
    _, ent9, lse9 = ops.linear_logprobs(h9.detach(), w13.detach(), t9, 1.25, 4)
    cases["linear_logprobs"] = (ops.linear_logprobs, (h9, w13, t9, 1.25, 4))
    back = (h9.detach(), w13.detach(), t9, lse9, ent9, _rand(gen, 9))
    cases["linear_logprobs_backward"] = (ops.linear_logprobs_backward, (*back, _rand(gen, 9), 1.25, 4, True, True))
    cases["linear_logprobs_backward without entropy"] = (
        ops.linear_logprobs_backward,
        (*back, None, 1.25, 0, True, False),
    )
    if kind == "all":
        labels = torch.tensor([1, -100, 4, 0, 12, 3, -100, 7, 2])
        cases["quantize_nf4"] = (ops.quantize_nf4, (_rand(gen, 20, 40), 64, True))
        cases["linear_cross_entropy"] = (
            ops.linear_cross_entropy,
            (_rand(gen, 9, 8, grad=True), _rand(gen, 13, 8, grad=True), labels, -100, True, 4, True, True),
        )
    return cases


def test_every_kernel_is_an_op_in_the_fastpeft_namespace_and_checked_here():
    assert set(dir(torch.ops.fastpeft)) >= OPS
    assert {case.split()[0] for case in op_cases("all")} == OPS


@pytest.mark.parametrize("case", sorted(op_cases("all")))
def test_opcheck_torch_backend(case):
    op, args = op_cases("all")[case]
    torch.library.opcheck(op, args)


@pytest.mark.triton
@pytest.mark.parametrize("case", sorted(op_cases("triton")))
def test_opcheck_triton_backend(case):
    """Real calls run the kernels in the interpreter; the fake impls must agree with them. (The AOT
    check is the torch backend's: a trace of CPU tensors always takes the torch path.)"""
    op, args = op_cases("triton")[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_public_ops_run_under_fake_tensor_mode_forward_and_backward():
    """What the memory ledger does: whole calls on fake CPU tensors, nothing real computed or cached."""
    clear_workspaces()
    for cache in (nf4._nf4_code_on, nf4._nf4_code_cpu, nf4._dynamic_map_cpu):
        cache.cache_clear()  # so that a fake tensor cached inside the block would be found below
    with FakeTensorMode():
        w = torch.randn(70, 96)
        q = quantize_nf4(w, 64, double_quant=True)
        assert isinstance(q.packed, FakeTensor) and q.packed.shape == (70 * 96 // 2,) and q.absmax.dtype == torch.uint8
        assert dequantize_nf4(q, torch.bfloat16).shape == (70, 96)
        x = torch.randn(33, 96, requires_grad=True)
        a, b = torch.randn(8, 96, requires_grad=True), torch.randn(70, 8, requires_grad=True)
        bias = torch.randn(70, requires_grad=True)
        y = lora_linear(x, q, bias, a, b, 0.25)
        y.sum().backward()
        assert y.shape == (33, 70) and x.grad.shape == x.shape and a.grad.shape == a.shape and b.grad.shape == b.shape
        assert bias.grad.shape == (70,)
        assert nf4_lora_decode(x[:4].detach(), q, None, a.detach(), b.detach(), 0.25).shape == (4, 70)
        a2, b2 = torch.randn(3, 96, requires_grad=True), torch.randn(70, 3, requires_grad=True)
        ids = torch.tensor([0, 1, -1] * 11)
        o_c, lse_c = cascade_prefix_attention(
            torch.randn(2, 2, 6, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16), torch.zeros(2, 5), 0.25
        )
        assert o_c.shape == (2, 2, 6, 16) and lse_c.shape == (2, 2, 6) and o_c.dtype == torch.float32
        routed = lora_linear_routed(x, q, bias, ids, [a, a2], [b, b2], [0.25, 2.0])
        routed.sum().backward()
        assert routed.shape == (33, 70) and a2.grad.shape == a2.shape and b2.grad.shape == b2.shape
        qh, kh = torch.randn(2, 4, 9, 16, requires_grad=True), torch.randn(2, 2, 9, 16, requires_grad=True)
        pk = torch.randn(3, 2, 16, requires_grad=True)
        o = prefix_attention(qh, kh, kh, pk, pk)
        o.sum().backward()
        assert o.shape == qh.shape and o.transpose(1, 2).is_contiguous() and pk.grad.shape == pk.shape
        hidden, head = torch.randn(2, 5, 16, requires_grad=True), torch.randn(11, 16, requires_grad=True)
        linear_cross_entropy(hidden, head, torch.randint(0, 11, (2, 5))).backward()
        assert hidden.grad.shape == hidden.shape and head.grad.shape == head.shape
        logp, ent = linear_logprobs(hidden, head, torch.randint(0, 11, (2, 5)), temperature=0.7)
        (logp.sum() + ent.sum()).backward()
        assert logp.shape == ent.shape == (2, 5) and isinstance(hidden.grad, FakeTensor)
    assert workspace_bytes() == 0  # a traced workspace is never cached
    assert not isinstance(nf4.nf4_code("cpu"), FakeTensor) and not isinstance(nf4.dynamic_map("cpu"), FakeTensor)


@pytest.mark.triton
def test_compiled_op_traces_the_torch_path_on_cpu_even_when_triton_is_forced():
    """AOTAutograd traces the op on fake tensors, where the interpreter cannot run: the traced CPU
    graph takes the torch implementation, and matches the eager interpreter run."""
    gen = torch.Generator().manual_seed(3)
    q = quantize_nf4(_rand(gen, 30, 48), 32, double_quant=True)
    x, a, b = _rand(gen, 20, 48, grad=True), _rand(gen, 4, 48, grad=True), _rand(gen, 30, 4, grad=True)
    compiled = torch.compile(lambda x, a, b: lora_linear(x, q, None, a, b, 0.5), backend="aot_eager", fullgraph=True)
    got = compiled(x, a, b)
    got.sum().backward()
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    want = lora_linear(x, q, None, a, b, 0.5)  # eager: the interpreter (force_backend("triton"))
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    for g, t in zip(grads, (x, a, b)):
        torch.testing.assert_close(g, t.grad, atol=2e-6, rtol=2e-6)


def test_backward_op_uses_the_kept_x_times_a():
    """dB = s·dYᵀ·(x·Aᵀ) with the x·Aᵀ the forward kept (no recomputation), an empty one recomputed."""
    gen = torch.Generator().manual_seed(5)
    x, w, a, b, gy = (_rand(gen, *s) for s in ((17, 12), (9, 12), (3, 12), (9, 3), (17, 9)))
    _, xa = torch.ops.fastpeft.lora_linear(x, w, None, a, b, 0.5, True)
    torch.testing.assert_close(xa, x @ a.t())
    other = _rand(gen, 17, 3)  # not x·Aᵀ: shows which one the backward reads
    _, _, grad_b = torch.ops.fastpeft.lora_linear_backward(
        gy, x, other, *weight_op_args(w), a, b, 0.5, False, False, True
    )
    torch.testing.assert_close(grad_b, 0.5 * gy.t() @ other)
    _, _, grad_b = torch.ops.fastpeft.lora_linear_backward(
        gy, x, xa[:0], *weight_op_args(w), a, b, 0.5, False, False, True
    )
    torch.testing.assert_close(grad_b, 0.5 * gy.t() @ (x @ a.t()))
    assert torch.ops.fastpeft.lora_linear(x, w, None, a, b, 0.5, False)[1].shape == (0, 3)


def test_profiler_sees_the_ops():
    gen = torch.Generator().manual_seed(6)
    q = quantize_nf4(_rand(gen, 16, 32), 32)
    x, a, b = _rand(gen, 20, 32, grad=True), _rand(gen, 2, 32, grad=True), _rand(gen, 16, 2, grad=True)
    with torch.profiler.profile() as prof:
        lora_linear(x, q, None, a, b, 1.0).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"fastpeft::nf4_lora_linear", "fastpeft::lora_linear_backward"} <= names


def test_dequantize_op_is_the_reference_on_the_torch_backend():
    gen = torch.Generator().manual_seed(7)
    q = quantize_nf4(_rand(gen, 5, 70) * math.pi, 32, double_quant=True)
    with force_backend("torch"):
        assert torch.equal(dequantize_nf4(q), nf4_dequantize.dequantize_nf4_reference(q))
