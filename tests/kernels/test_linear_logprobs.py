"""Chunked per-token log-probs and entropy of an LM head against the full-logits computation:
the row steps against hand-written float64 formulas, the whole op (values and gradients) in float64
on the chunked torch path and in fp32/bf16 on the Triton row kernels (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.linear_logprobs import (
    linear_logprobs,
    linear_logprobs_reference,
    logprob_grad_reference,
    logprob_grad_triton,
    logprob_stats_reference,
    logprob_stats_triton,
)

# (atol, rtol) of values and gradients against float64; bf16 logits carry ~3 significant digits
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (3e-5, 3e-5), torch.bfloat16: (4e-2, 4e-2)}
SHAPES = [(1, 8, 5), (3, 16, 37), (17, 24, 130), (40, 12, 33)]  # (N, H, V): M = 1, odd sizes, several chunks


def _float64_rows(logits: torch.Tensor, targets: torch.Tensor, inv_temp: float, g: torch.Tensor, e: torch.Tensor):
    """Hand-written float64 logp, lse, entropy and dL/dlogits for L = Σ g·logp + Σ e·ent."""
    z = logits.double() * inv_temp
    top = z.max(-1, keepdim=True).values
    lse = (top + (z - top).exp().sum(-1, keepdim=True).log()).squeeze(-1)
    p = (z - lse[:, None]).exp()
    mean_z = (p * z).sum(-1)
    logp = z[torch.arange(len(targets)), targets] - lse
    onehot = torch.zeros_like(z)
    onehot[torch.arange(len(targets)), targets] = 1.0
    dz = g.double()[:, None] * (onehot - p) - e.double()[:, None] * p * (z - mean_z[:, None])
    return logp, lse, lse - mean_z, dz * inv_temp


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("rows,vocab", [(1, 5), (3, 37), (17, 130)])
@pytest.mark.parametrize("inv_temp", [1.0, 1 / 0.7])
def test_row_steps_match_float64(impl, rows, vocab, inv_temp):
    gen = torch.Generator().manual_seed(rows * 100 + vocab)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[0] = vocab - 1  # the last column, a classic off-by-one spot
    g, e = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    want_logp, want_lse, want_ent, want_dz = _float64_rows(logits, targets, inv_temp, g, e)
    # a 32-wide tile makes V=37/130 span several tiles of the online loops, the last one partial
    kw = {"block_v": 32} if impl == "triton" else {}
    stats = logprob_stats_triton if impl == "triton" else logprob_stats_reference
    grad = logprob_grad_triton if impl == "triton" else logprob_grad_reference
    logp, lse, ent = stats(logits, targets, inv_temp, **kw)
    for got, want in ((logp, want_logp), (lse, want_lse), (ent, want_ent)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    buf = logits.clone()
    out = grad(buf, targets, lse, lse - ent, g, e, inv_temp, **kw)
    assert out.data_ptr() == buf.data_ptr()  # in place
    torch.testing.assert_close(buf.double(), want_dz, atol=1e-5, rtol=1e-5)  # fp32 math on |z| ~ 10
    buf = logits.clone()
    grad(buf, targets, lse, None, g, None, inv_temp, **kw)  # no entropy term
    no_ent = _float64_rows(logits, targets, inv_temp, g, torch.zeros_like(e))[3]
    torch.testing.assert_close(buf.double(), no_ent, atol=1e-6, rtol=1e-5)


def _inputs(n, h, v, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2 / h**0.5)
    targets = torch.randint(0, v, (n,), generator=gen)
    a, b = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, weight, targets, a, b


def _run(fn, hidden, weight, targets, a, b, dtype, entropy_in_loss=True, **kw):
    h = hidden.to(dtype).detach().requires_grad_()
    w = weight.to(dtype).detach().requires_grad_()
    logp, ent = fn(h, w, targets, **kw)
    loss = (logp.double() * a).sum() + ((ent.double() * b).sum() if entropy_in_loss else 0.0)
    loss.backward()
    return logp.detach().double(), ent.detach().double(), h.grad.double(), w.grad.double()


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_full_logits_in_float64(n, h, v, chunk_size, temperature):
    """The chunked path (torch row steps) in float64: values and gradients equal the full-logits
    computation to float64 rounding, for any chunking and temperature."""
    args = _inputs(n, h, v, seed=n * 7 + v)
    want = _run(linear_logprobs_reference, *args, torch.float64, temperature=temperature)
    got = _run(linear_logprobs, *args, torch.float64, temperature=temperature, chunk_size=chunk_size)
    atol, rtol = TOLERANCES[torch.float64]
    for name, g, w in zip(("logp", "entropy", "d hidden", "d weight"), got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def test_gradcheck_float64():
    hidden, weight, targets, _, _ = _inputs(5, 6, 11, seed=3)
    hidden.requires_grad_()
    weight.requires_grad_()

    def both(h, w):
        return linear_logprobs(h, w, targets, temperature=0.8, chunk_size=2)

    assert torch.autograd.gradcheck(both, (hidden, weight), eps=1e-6, atol=1e-8)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v", SHAPES[1:3])
def test_triton_row_kernels_match_float64(dtype, n, h, v):
    args = _inputs(n, h, v, seed=v)
    want = _run(linear_logprobs_reference, *args, torch.float64, temperature=0.9)
    got = _run(linear_logprobs, *args, dtype, temperature=0.9, chunk_size=8)
    atol, rtol = TOLERANCES[dtype]
    for name, g, w in zip(("logp", "entropy", "d hidden", "d weight"), got, want):
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def test_unused_entropy_costs_no_entropy_gradient():
    args = _inputs(9, 8, 21, seed=5)
    with_zero = _run(linear_logprobs, *args[:4], torch.zeros(9, dtype=torch.float64), torch.float64, chunk_size=4)
    without = _run(linear_logprobs, *args, torch.float64, entropy_in_loss=False, chunk_size=4)
    for g, w in zip(with_zero, without):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


def test_autocast_gives_fp32_master_weights_fp32_gradients():
    hidden, weight, targets, a, _ = _inputs(6, 16, 40, seed=9)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = linear_logprobs(h, w, targets)
    assert logp.dtype == ent.dtype == torch.float32
    (logp * a.float()).sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    want = linear_logprobs_reference(hidden, weight, targets)[0]
    torch.testing.assert_close(logp.double(), want, atol=5e-2, rtol=5e-2)


def test_leading_dims_and_frozen_head():
    hidden, weight, targets, _, _ = _inputs(12, 8, 19, seed=1)
    h = hidden.reshape(3, 4, 8).requires_grad_()
    logp, ent = linear_logprobs(h, weight, targets.reshape(3, 4), chunk_size=5)  # weight needs no grad
    assert logp.shape == ent.shape == (3, 4)
    logp.sum().backward()
    want = linear_logprobs_reference(hidden, weight, targets)[0]
    torch.testing.assert_close(logp.reshape(-1), want, atol=1e-12, rtol=1e-12)
    assert h.grad is not None and weight.grad is None


def test_bad_inputs_name_what_is_wrong():
    hidden, weight, targets, _, _ = _inputs(4, 8, 10, seed=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_logprobs(hidden, weight, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="do not fit"):
        linear_logprobs(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="must match"):
        linear_logprobs(hidden, weight, targets[:3])
    with pytest.raises(TypeError, match="int64 or int32"):
        linear_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(TypeError, match="share one float dtype"):
        linear_logprobs(hidden.float(), weight, targets)


def test_fake_implementations_report_the_chunk_to_the_memory_ledger():
    # under the ledger (fake tensors) the ops' register_fake implementations add the [C, V] logits
    # chunk the real op holds (and, backward, the chunk's dH rows) on top of their outputs
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastpeft.kernels.workspace import isolated_workspaces
    from fastpeft.training.memory_ledger import MemoryTracker

    n, h, v, chunk = 48, 32, 1000, 16
    with FakeTensorMode(), isolated_workspaces():
        hidden = torch.empty(n, h, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(v, h, dtype=torch.bfloat16)
        targets = torch.zeros(n, dtype=torch.long)
        tracker = MemoryTracker()
        with tracker:
            tracker.set_phase("forward")
            logp, _ = linear_logprobs(hidden, weight, targets, chunk_size=chunk)
            forward_peak = tracker.peak
            tracker.set_phase("backward")
            logp.sum().backward()
    chunk_logits = chunk * v * 2
    assert forward_peak >= chunk_logits + 3 * n * 4  # the chunk on top of logp, ent, lse
    assert tracker.peak >= chunk_logits + chunk * h * 2 + n * h * 2  # + its dH rows, on top of dH
    assert tracker.peak < 2 * (chunk_logits + n * h * 2 + 3 * n * 4 + chunk * h * 2)  # one chunk, not [N, V]
