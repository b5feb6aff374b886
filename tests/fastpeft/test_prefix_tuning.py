"""Prefix tuning on tiny Llama / Qwen2 / Mistral models: parity with PEFT 0.21 (outputs and
gradients), the Triton path in the interpreter, generation, training, folding, fallbacks, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PrefixTuningConfig as PeftPrefixTuningConfig
from peft import get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import fastpeft.kernels.prefix_attention as kernel
from fastpeft import PrefixTuningConfig, add_prefix_tuning
from fastpeft.prefix_tuning import PrefixAdapter, attach_prefix_adapter

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**TINY, **overrides})).eval()


def padded_batch(batch: int = 2, length: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask with one left-padded and one right-padded row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return ids, mask


def peft_and_ours(family: str, n_virtual: int = 3, projection: bool = False):
    """A PEFT prefix-tuned model and our adapter on an identical copy, sharing the same weights."""
    base = tiny_model(family)
    ours = copy.deepcopy(base)
    config = PeftPrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=n_virtual,
        prefix_projection=projection,
        encoder_hidden_size=24 if projection else None,
    )
    peft_model = get_peft_model(base, config)
    encoder = peft_model.prompt_encoder["default"]
    adapter = add_prefix_tuning(ours, PrefixTuningConfig(n_virtual, projection, 24 if projection else None))
    with torch.no_grad():
        if projection:
            adapter.embedding.weight.copy_(encoder.embedding.weight)
            for i in (0, 2):
                adapter.transform[i].weight.copy_(encoder.transform[i].weight)
                adapter.transform[i].bias.copy_(encoder.transform[i].bias)
        else:
            adapter.prefix_embeddings.copy_(encoder.embedding.weight)
    return peft_model, ours, adapter


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_peft(family):
    peft_model, ours, _ = peft_and_ours(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_gradients_match_peft_with_reparameterisation():
    peft_model, ours, adapter = peft_and_ours("llama", projection=True)
    peft_model.train()
    ours.train()
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    encoder = peft_model.prompt_encoder["default"]
    torch.testing.assert_close(adapter.embedding.weight.grad, encoder.embedding.weight.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(adapter.transform[2].weight.grad, encoder.transform[2].weight.grad, atol=1e-6, rtol=1e-4)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "fastpeft_prefix" not in n)


@pytest.mark.triton
def test_triton_path_matches_peft_in_interpreter(monkeypatch):
    launches = []
    launcher = kernel.prefix_attention_forward
    monkeypatch.setattr(kernel, "prefix_attention_forward", lambda *a: launches.append(1) or launcher(*a))
    peft_model, ours, _ = peft_and_ours("qwen2")
    ids, mask = padded_batch(length=6)
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert len(launches) == 2  # one Triton launch per layer
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fold_keeps_outputs_and_drops_the_mlp():
    _, ours, adapter = peft_and_ours("llama", projection=True)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = ours(input_ids=ids, attention_mask=mask).logits
        adapter.fold()
        after = ours(input_ids=ids, attention_mask=mask).logits
    assert not hasattr(adapter, "transform") and adapter.prefix_embeddings.shape == (3, 2 * 2 * 2 * 16)
    torch.testing.assert_close(after, before)


def test_generate_matches_uncached_greedy_decoding():
    """Cached decoding (T_q = 1 < T_k, positions shifted by P) agrees with full recomputation."""
    model = tiny_model("mistral", pad_token_id=0)
    add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=3))
    ids, mask = padded_batch(length=6)
    mask[1] = 1  # generation pads on the left only
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        tokens, running = ids, mask
        for _ in range(4):
            positions = (running.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=tokens, attention_mask=running, position_ids=positions, use_cache=False).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            running = torch.cat([running, torch.ones_like(running[:, :1])], dim=1)
    assert torch.equal(out, tokens)


def test_prefix_tuned_model_trains():
    model = tiny_model("llama")
    adapter = add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True))
    model.train()
    batch = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(adapter.adapter_params(), lr=0.1)
    losses = []
    for _ in range(30):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_disabled_adapter_is_the_base_model_and_remove_restores_it():
    model = tiny_model("llama")
    base = copy.deepcopy(model)
    adapter = add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=3))
    ids, mask = padded_batch()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        with_prefix = model(input_ids=ids, attention_mask=mask).logits
        adapter.disabled = True
        disabled = model(input_ids=ids, attention_mask=mask).logits
        adapter.remove()
        removed = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # outputs at padding positions are not comparable across attention implementations
    torch.testing.assert_close(disabled[real], want[real], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(with_prefix[real], want[real], atol=1e-3)
    assert model.config._attn_implementation == base.config._attn_implementation
    assert not hasattr(model, "fastpeft_prefix")
    torch.testing.assert_close(removed, want)


def test_output_attentions_falls_back_to_the_reference_with_a_reason():
    peft_model, ours, _ = peft_and_ours("llama")
    ids, mask = padded_batch()
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions"):
        out = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    want = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, want, atol=2e-5, rtol=1e-4)
    weights = out.attentions[0]
    assert weights.shape == (2, 4, 7, 3 + 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))


def test_clear_errors():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        add_prefix_tuning(gpt2, PrefixTuningConfig(num_virtual_tokens=2))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\(2, 2, 32\) .* \(2, 2, 16\)"):
        attach_prefix_adapter(model, PrefixAdapter(2, 2, 32, 3))
    with pytest.raises(ValueError, match=r"subset of 0..1"):
        add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=2, layers=[5]))
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=0)
    add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="already"):
        add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=2))
