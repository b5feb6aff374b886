"""Offloaded activation checkpointing: exact gradients, block inputs in host memory, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import fastpeft
from fastpeft.training.ledger_step import LedgerSpec, measure_step
from fastpeft.training.model_setup import enable_gradient_checkpointing
from fastpeft.training.offload import ActivationOffloader, enable_offloaded_checkpointing, offloaded_checkpoint
from fastpeft.training.step_design import StepDesign

CONFIG = transformers.LlamaConfig(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
)


def _model(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(CONFIG)
    fastpeft.inject(
        model,
        fastpeft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False
        ),
    )
    return model.train()


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, seed: int = 1) -> tuple[float, dict]:
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradients_are_exactly_those_of_checkpointing(dropout):
    base = _model(dropout)
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(3))
    plain, ckpt, offl = (copy.deepcopy(base) for _ in range(3))
    enable_gradient_checkpointing(ckpt)
    enable_offloaded_checkpointing(offl)
    loss_c, grads_c = _loss_and_grads(ckpt, ids)
    loss_o, grads_o = _loss_and_grads(offl, ids)
    assert loss_c == loss_o and len(grads_o) == 3 * 7 * 2
    for name in grads_c:  # same RNG replay for the dropout masks, same arithmetic: bit for bit
        torch.testing.assert_close(grads_o[name], grads_c[name], rtol=0, atol=0, msg=name)
    if dropout == 0.0:
        _, grads_p = _loss_and_grads(plain, ids)
        for name in grads_p:
            torch.testing.assert_close(grads_o[name], grads_p[name], rtol=1e-6, atol=1e-7, msg=name)


def test_block_inputs_live_on_the_host():
    cfg = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    kept = measure_step(LedgerSpec(cfg, seq_len=2048, design=StepDesign()))
    off = measure_step(LedgerSpec(cfg, seq_len=2048, design=StepDesign(offload_activations=True)))
    block_input = 2048 * 64 * 2  # [1, T, H] bf16
    assert kept.host_peak_bytes == 0
    assert off.host_peak_bytes == 4 * block_input  # every block's input, on the host at once
    # plain checkpointing holds every block input through the backward; offloading at most two
    assert kept.peak_by_category["activations"] >= 4 * block_input > off.peak_by_category["activations"]
    assert kept.peak_bytes - off.peak_bytes >= 2 * block_input


def test_offloader_round_trip_and_errors():
    offloader = ActivationOffloader("cpu")
    a, b = torch.randn(3, 5), torch.randn(2, 7)
    sa, sb = offloader.offload(a), offloader.offload(b)
    assert torch.equal(offloader.fetch(sb), b)  # fetching b starts a's prefetch
    assert sa.device_copy is not None
    assert torch.equal(offloader.fetch(sa), a)
    with pytest.raises(RuntimeError, match="already fetched"):
        offloader.fetch(sa)
    with pytest.raises(TypeError, match="first positional"):
        offloaded_checkpoint(offloader, lambda *a: a, "not a tensor")
    with pytest.raises(TypeError, match="transformers model"):
        enable_offloaded_checkpointing(torch.nn.Linear(2, 2))
