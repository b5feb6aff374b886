"""LeanRMSNorm: transformers' Llama RMSNorm outputs bit for bit, gradients against float64."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fastpeft.lean_rms_norm import LeanRMSNorm, lean_rms_norm, lean_rms_norms


def _norm(dtype: torch.dtype, h: int, seed: int = 0) -> LlamaRMSNorm:
    torch.manual_seed(seed)
    norm = LlamaRMSNorm(h, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(h))
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "h", "chunk"), [(1, 8, 4), (17, 40, 5), (33, 13, 64)])
def test_forward_is_bitwise_transformers(dtype, rows, h, chunk):
    norm = _norm(dtype, h)
    x = torch.randn(2, rows, h).to(dtype)
    torch.testing.assert_close(LeanRMSNorm(norm, chunk)(x), norm(x), rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_gradients_match_float64(dtype, tol, train_weight):
    norm = _norm(dtype, 24)
    norm.weight.requires_grad_(train_weight)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 11, 24, generator=gen).to(dtype).requires_grad_(True)
    grad_y = torch.randn(3, 11, 24, generator=gen).to(dtype)
    inputs = [x, norm.weight] if train_weight else [x]
    grads = torch.autograd.grad(LeanRMSNorm(norm, 4)(x), inputs, grad_y)
    x64 = x.detach().double().requires_grad_(True)
    w64 = norm.weight.detach().double().requires_grad_(True)
    y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))
    refs = torch.autograd.grad(y64, [x64, w64] if train_weight else [x64], grad_y.double())
    for got, ref in zip(grads, refs):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


def test_swapped_into_a_model_and_saves_less():
    import transformers

    from fastpeft.training.ledger_step import LedgerSpec, measure_step
    from fastpeft.training.step_design import StepDesign

    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, vocab_size=20
        )
    )
    assert lean_rms_norms(model) == 5  # two per block and the final one
    assert isinstance(model.model.norm, LeanRMSNorm) and model.model.norm.weight.requires_grad
    cfg = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    plain = measure_step(LedgerSpec(cfg, seq_len=1024, design=StepDesign()))
    lean = measure_step(LedgerSpec(cfg, seq_len=1024, design=StepDesign(lean_norms=True)))
    assert lean.peak_bytes < plain.peak_bytes - 1024 * 64 * 4  # at least one fp32 [T, H] fewer


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="do not fit"):
        lean_rms_norm(torch.randn(2, 5), torch.ones(4), 1e-6)
    with pytest.raises(TypeError, match="Llama-style RMSNorm"):
        LeanRMSNorm(torch.nn.LayerNorm(4))


@pytest.mark.gpu
def test_cuda_8b_shapes():
    norm = _norm(torch.bfloat16, 4096).cuda()
    x = torch.randn(1, 8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn_like(x)
    lean = LeanRMSNorm(norm)
    torch.testing.assert_close(lean(x), norm(x), rtol=0, atol=0)
    (gx,) = torch.autograd.grad(lean(x), x, grad_y)
    x64 = x.detach().double().requires_grad_(True)
    w64 = norm.weight.detach().double()
    y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))
    (ref,) = torch.autograd.grad(y64, x64, grad_y.double())
    assert ((gx.double() - ref).norm() / ref.norm()) < 1e-2
