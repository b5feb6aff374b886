"""P-Tuning v2 and dynamic mixed prompts: gate math, pruned layers running plain causal attention,
folding, training with the sparsity penalty, and the gate gradient through the Triton kernel."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastpeft.prefix_attention_hf as hf
from fastpeft import (
    MixedPromptsConfig,
    PrefixTuningConfig,
    PTuningV2Config,
    add_mixed_prompts,
    add_prefix_tuning,
    add_ptuning_v2,
)
from fastpeft.kernels.backend import force_backend
from fastpeft.mixed_prompts import HardConcreteGate, SigmoidGate

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    return ids, mask


@pytest.fixture
def prefix_calls(monkeypatch):
    """Records, per attention call, whether the kernel got a prefix."""
    calls: list[bool] = []
    real = hf.prefix_attention

    def spy(q, k, v, prefix_k=None, *args, **kwargs):
        calls.append(prefix_k is not None)
        return real(q, k, v, prefix_k, *args, **kwargs)

    monkeypatch.setattr(hf, "prefix_attention", spy)
    return calls


def test_hard_concrete_gate_math():
    gate = HardConcreteGate(2)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([0.0, 2.0]))
    shift = -(2.0 / 3.0) * math.log(0.1 / 1.1)
    expected_l0 = sum(1.0 / (1.0 + math.exp(-(a + shift))) for a in (0.0, 2.0))
    torch.testing.assert_close(gate.penalty(), torch.tensor(expected_l0))
    gate.eval()
    torch.testing.assert_close(gate(), torch.tensor([0.5, 1.2 / (1.0 + math.exp(-2.0)) - 0.1]))
    gate.train()
    torch.manual_seed(0)
    samples = torch.stack([gate() for _ in range(200)])
    assert samples.min() >= 0.0 and samples.max() <= 1.0 and samples.std(0).min() > 0.05
    assert (samples == 1.0).any() and (samples[:, 0] == 0.0).any()  # the stretch reaches exact 0 and 1
    samples.sum().backward()
    assert torch.isfinite(gate.log_alpha.grad).all() and gate.log_alpha.grad.abs().sum() > 0


def test_sigmoid_gate_l1_penalty_and_pruning():
    gate = SigmoidGate(3, prune_below=0.1)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([-4.0, 0.0, 4.0]))
    torch.testing.assert_close(gate.penalty(), torch.sigmoid(gate.logits).sum())
    gate.eval()
    torch.testing.assert_close(gate(), torch.tensor([0.0, 0.5, torch.sigmoid(torch.tensor(4.0)).item()]))


def test_pruned_layer_runs_plain_causal_attention(prefix_calls):
    """Gates (0, 1, 1): layer 0 gets no prefix at all; the rest equals prefix tuning on layers 1, 2."""
    model = tiny_model()
    adapter = add_mixed_prompts(model, MixedPromptsConfig(num_virtual_tokens=3))
    with torch.no_grad():
        adapter.gate.log_alpha.copy_(torch.tensor([-10.0, 10.0, 10.0]))
    reference = tiny_model()
    plain = add_prefix_tuning(reference, PrefixTuningConfig(num_virtual_tokens=3, layers=[1, 2]))
    with torch.no_grad():
        plain.prefix_embeddings.copy_(adapter.kv_table()[:, 1:].reshape(3, -1))
    ids, mask = batch()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        assert prefix_calls == [False, True, True]
        want = reference(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want)
        adapter.fold()
        assert adapter.layers == [1, 2] and adapter.gate is None
        torch.testing.assert_close(adapter.folded_logit_bias, torch.zeros(2))
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)


def test_fully_pruned_adapter_is_the_base_model():
    model = tiny_model()
    base = copy.deepcopy(model)
    adapter = add_mixed_prompts(model, MixedPromptsConfig(num_virtual_tokens=3, gate_init_log_alpha=-10.0))
    ids, mask = batch()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        adapter.fold()
        assert adapter.layers == [] and adapter.prefix_embeddings.numel() == 0
        folded = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(folded, got)


def test_ptuning_v2_chosen_layers_and_soft_gates_fold_exactly(prefix_calls):
    model = tiny_model()
    adapter = add_ptuning_v2(model, PTuningV2Config(num_virtual_tokens=2, layers=[0, 2], prune_below=0.2))
    with torch.no_grad():
        adapter.gate.logits.copy_(torch.tensor([-3.0, 0.7]))  # g = 0.047 (pruned), 0.668
    ids, mask = batch()
    with torch.no_grad():
        gated = model(input_ids=ids, attention_mask=mask).logits
        assert prefix_calls == [False, False, True]
        adapter.fold()
        assert adapter.layers == [2]
        torch.testing.assert_close(adapter.folded_logit_bias, torch.sigmoid(torch.tensor([0.7])).log())
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, gated)


def test_mixed_prompts_train_with_the_sparsity_penalty():
    model = tiny_model()
    adapter = add_mixed_prompts(model, MixedPromptsConfig(num_virtual_tokens=4, gate_init_log_alpha=1.0))
    model.train()
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(adapter.adapter_params(), lr=0.1)
    torch.manual_seed(0)
    objectives = []
    for _ in range(20):
        objective = model(input_ids=ids, labels=ids).loss + 0.05 * adapter.sparsity_penalty()
        optimizer.zero_grad()
        objective.backward()
        assert torch.isfinite(adapter.gate.log_alpha.grad).all()
        optimizer.step()
        objectives.append(objective.item())
    assert sum(objectives[-3:]) / 3 < objectives[0] - 0.2, objectives


@pytest.mark.triton
def test_gate_gradient_through_the_kernel_matches_the_reference():
    """A sigmoid-gated model's loss and gradients (incl. the gate's, via the prefix-logit-bias
    gradient) from the Triton kernels in the interpreter equal the torch reference's."""
    model = tiny_model()
    adapter = add_ptuning_v2(model, PTuningV2Config(num_virtual_tokens=2, layers=[1, 2], gate_init_logit=0.5))
    model.train()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for name in ("triton", "torch"):
        adapter.zero_grad()
        with force_backend(name):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
        results.append((loss.detach(), adapter.prefix_embeddings.grad.clone(), adapter.gate.logits.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert results[0][2].abs().min() > 0
