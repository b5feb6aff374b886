"""Chunked / fused linear-cross-entropy against a float64 reference that materializes the logits."""

from __future__ import annotations

import pytest
import torch

from fastpeft.kernels.backend import force_backend
from fastpeft.kernels.linear_cross_entropy import (
    cross_entropy_grad_reference,
    cross_entropy_grad_triton,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

# (dtype, atol, rtol) for loss and gradients; bf16 logits carry ~3 significant digits
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def _float64_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Hand-written float64 loss per row and dloss/dlogits (softmax − onehot, 0 on ignored rows)."""
    x = logits.double()
    top = x.max(-1, keepdim=True).values
    lse = (top + (x - top).exp().sum(-1, keepdim=True).log()).squeeze(-1)
    keep = labels != ignore_index
    safe = labels.clamp(min=0)
    loss = torch.where(keep, lse - x.gather(1, safe[:, None]).squeeze(1), torch.zeros_like(lse))
    grad = (x - lse[:, None]).exp()
    grad[torch.arange(len(labels)), safe] -= 1.0
    grad[~keep] = 0.0
    return loss, lse, grad


def _labels(n: int, v: int, gen: torch.Generator, ignore_frac: float = 0.3) -> torch.Tensor:
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    return labels


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("rows,vocab", [(1, 5), (3, 37), (17, 130)])
def test_row_kernel_matches_float64(impl, rows, vocab):
    gen = torch.Generator().manual_seed(rows * 1000 + vocab)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    labels = _labels(rows, vocab, gen)
    labels[0] = vocab - 1  # the last column, a classic off-by-one spot
    want_loss, want_lse, want_grad = _float64_ce(logits, labels)
    buf = logits.clone()
    out = (torch.full((rows,), float("nan")), torch.full((rows,), float("nan")))
    if impl == "triton":
        # a 32-wide tile makes V=37/130 span several tiles of the online loop, the last one partial
        loss, lse = cross_entropy_grad_triton(buf, labels, -100, out=out, block_v=32)
    else:
        loss, lse = cross_entropy_grad_reference(buf, labels, -100, out=out)
    assert loss.data_ptr() == out[0].data_ptr() and lse.data_ptr() == out[1].data_ptr()
    torch.testing.assert_close(loss.double(), want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf.double(), want_grad, atol=1e-6, rtol=1e-5)


def _check_against_reference(n, h, v, dtype, chunk_size, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    labels = _labels(n, v, gen)
    labels[0] = 0  # at least one counted row (torch's mean over none is NaN; ours is 0, tested below)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    want = linear_cross_entropy_reference(h64, w64, labels, reduction=reduction)  # materializes the logits
    want.backward()

    hid = hidden.to(dtype).requires_grad_()
    wt = weight.to(dtype).requires_grad_()
    got = linear_cross_entropy(hid, wt, labels, reduction=reduction, chunk_size=chunk_size)
    got.backward()
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, abs(want.item()))
    torch.testing.assert_close(got.double(), want.detach(), atol=atol * scale, rtol=rtol)
    torch.testing.assert_close(hid.grad.double(), h64.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(wt.grad.double(), w64.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("n,h,v", [(1, 8, 11), (3, 16, 37), (17, 24, 130), (33, 20, 7)])
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_matches_float64(n, h, v, chunk_size, reduction):
    _check_against_reference(n, h, v, torch.float32, chunk_size, reduction, seed=n * 7 + v)


def test_chunked_bfloat16():
    _check_against_reference(29, 32, 70, torch.bfloat16, 8, "mean", seed=3)


@pytest.mark.triton
@pytest.mark.parametrize("n,h,v,chunk", [(1, 16, 5, None), (9, 16, 33, 4)])
def test_triton_path_matches_float64(n, h, v, chunk):
    _check_against_reference(n, h, v, torch.float32, chunk, "mean", seed=n + v)


def test_leading_dims_and_all_ignored():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(13, 8, generator=gen, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
    labels[1, 2] = 4
    hidden.grad = weight.grad = None
    got = linear_cross_entropy(hidden, weight, labels, reduction="sum")
    want = torch.nn.functional.cross_entropy((hidden @ weight.t()).reshape(-1, 13), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(got, want)


def test_frozen_weight_and_no_grad():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 8, generator=gen, requires_grad=True)
    weight = torch.randn(9, 8, generator=gen)  # frozen LM head (LoRA training)
    labels = torch.randint(0, 9, (6,), generator=gen)
    linear_cross_entropy(hidden, weight, labels).backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels)
    want = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels)
    torch.testing.assert_close(loss, want)


def test_autocast_bf16_gives_fp32_master_grads():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 16, generator=gen, requires_grad=True)
    weight = torch.randn(21, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 21, (10,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert weight.grad.dtype == torch.float32
    want = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().t(), labels)
    torch.testing.assert_close(loss.double(), want, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(hidden=(4, 8), weight=(9, 7), labels=(4,)), ValueError, "do not fit"),
        (dict(hidden=(4, 8), weight=(9, 8), labels=(5,)), ValueError, "labels"),
        (dict(hidden=(4, 8), weight=(9, 8), labels=(4,), bad_label=9), ValueError, "outside the vocabulary"),
        (dict(hidden=(4, 8), weight=(9, 8), labels=(4,), wdtype=torch.float64), TypeError, "dtype"),
        (dict(hidden=(4, 8), weight=(9, 8), labels=(4,), reduction="none"), ValueError, "reduction"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    hidden = torch.randn(*kwargs["hidden"])
    weight = torch.randn(*kwargs["weight"], dtype=kwargs.get("wdtype", torch.float32))
    labels = torch.randint(0, 3, kwargs["labels"])
    if "bad_label" in kwargs:
        labels[1] = kwargs["bad_label"]
    with pytest.raises(exc, match=match):
        linear_cross_entropy(hidden, weight, labels, reduction=kwargs.get("reduction", "mean"))


def test_row_kernel_rejects_bad_chunk():
    with pytest.raises(ValueError, match="labels must be int64"):
        cross_entropy_grad_reference(torch.randn(3, 4), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="unit column stride"):
        cross_entropy_grad_reference(torch.randn(4, 3).t(), torch.zeros(3, dtype=torch.int64))


def test_dispatch_follows_the_backend_switch(monkeypatch):
    import fastpeft.kernels.linear_cross_entropy as lce

    calls = []
    real = lce.cross_entropy_grad_reference
    monkeypatch.setattr(lce, "cross_entropy_grad_triton", lambda *a, **k: calls.append("triton") or real(*a, **k))
    monkeypatch.setattr(lce, "cross_entropy_grad_reference", lambda *a, **k: calls.append("torch") or real(*a, **k))
    hidden = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(5, 4)
    with force_backend("torch"):
        linear_cross_entropy(hidden, weight, torch.tensor([1, -100, 4]), chunk_size=1).backward()
    assert calls == ["torch", "torch"]  # one call per chunk of non-ignored rows
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize(
    "n_rows,vocab",
    [(1, 5), (127, 32000), (1023, 32000), (2047, 32000), (8191, 128256), (32768, 128256), (300_001, 32000), (3, 2**40)],
)
def test_chunk_rule_is_a_byte_budget(n_rows, vocab):
    """Short batches are one chunk (the LM head read once, as when materialising the logits); a
    chunk's fp32 logits never exceed the budget (one row at least); chunks are evenly filled."""
    from fastpeft.kernels.linear_cross_entropy import CHUNK_BYTES, default_chunk_size

    chunk = default_chunk_size(n_rows, vocab)
    n_chunks = -(-n_rows // chunk)
    assert chunk == 1 or chunk * vocab * 4 <= CHUNK_BYTES
    fits = max(1, CHUNK_BYTES // (4 * vocab))
    assert n_chunks == -(-n_rows // (fits - fits % 16 if fits >= 16 else fits))  # the fewest chunks
    assert n_chunks * chunk - n_rows < 16 * n_chunks  # evenly filled: under 16 rows to spare per chunk


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_row_kernel_grad_scale(impl):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 37, generator=gen) * 3
    labels = torch.tensor([0, 36, -100, 7])
    _, _, want_grad = _float64_ce(logits, labels)
    buf = logits.clone()
    if impl == "triton":
        cross_entropy_grad_triton(buf, labels, -100, block_v=16, grad_scale=0.25)
    else:
        cross_entropy_grad_reference(buf, labels, -100, grad_scale=0.25)
    torch.testing.assert_close(buf.double(), 0.25 * want_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_size,ignored", [(None, False), (4, False), (4, True)])
def test_every_row_fast_path_and_upstream_gradient(chunk_size, ignored):
    """No ignored label: chunks are slices of hidden, dH written in place, dW from its first GEMM;
    an upstream gradient other than 1 still scales both."""
    gen = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(10, 12, generator=gen), torch.randn(23, 12, generator=gen) / 4
    labels = torch.randint(0, 23, (10,), generator=gen)
    if ignored:
        labels[3] = -100
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (torch.nn.functional.cross_entropy(h64 @ w64.t(), labels) * 2.5).backward()
    hid, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (linear_cross_entropy(hid, wt, labels, chunk_size=chunk_size) * 2.5).backward()
    torch.testing.assert_close(hid.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wt.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_llama3_vocabulary_matches_float64():
    """The Triton row kernel and the chunk loop on a GPU at Llama-3's shapes (H 4096, V 128256), bf16."""
    gen = torch.Generator().manual_seed(0)
    n, h, v = 1024, 4096, 128256
    hidden = torch.randn(n, h, generator=gen).cuda()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).cuda()
    labels = _labels(n, v, gen).cuda()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = torch.nn.functional.cross_entropy(h64 @ w64.t(), labels, ignore_index=-100)
    want.backward()
    hid, wt = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    got = linear_cross_entropy(hid, wt, labels)
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), atol=3e-2, rtol=3e-2)
    for g, w in ((hid.grad, h64.grad), (wt.grad, w64.grad)):
        err = (g.double() - w).norm() / w.norm()
        assert err < 2e-2, f"relative error {err:.2e}"
