"""Prompt tuning: parity with PEFT 0.21 on tiny Llama / Qwen2 / Mistral models (logits, loss,
gradient), initialisation from text, training, and PEFT-format interop both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import PromptTuningConfig as PeftPromptTuningConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fastpeft import PromptTuningConfig, add_prompt_tuning, load_prompt_adapter, save_prompt_adapter

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


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**TINY)).eval()


def padded_batch(length: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def peft_and_ours(family: str, n_virtual: int = 4):
    base = tiny_model(family)
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(base, PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual))
    adapter = add_prompt_tuning(ours, PromptTuningConfig(num_virtual_tokens=n_virtual))
    with torch.no_grad():
        adapter.prompt_embeddings.copy_(peft_model.prompt_encoder["default"].embedding.weight)
    return peft_model, ours, adapter


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_loss_and_gradient_match_peft(family):
    peft_model, ours, adapter = peft_and_ours(family)
    ids, mask, labels = padded_batch()
    want = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == (2, 4 + 7, TINY["vocab_size"])
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    want.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(
        adapter.prompt_embeddings.grad, peft_model.prompt_encoder["default"].embedding.weight.grad
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "classify": 5, "the": 6, "review": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_init_from_text_repeats_the_token_embeddings():
    model = tiny_model()
    words = model.get_input_embeddings().weight.detach()
    adapter = add_prompt_tuning(
        model, PromptTuningConfig(5, init="text", init_text="classify the review"), tiny_tokenizer()
    )
    torch.testing.assert_close(adapter.prompt_embeddings.detach(), words[[5, 6, 7, 5, 6]])
    assert adapter.prompt_embeddings.requires_grad and not model.get_input_embeddings().weight.requires_grad


def test_random_init_has_the_embedding_scale_and_the_model_trains():
    model = tiny_model()
    adapter = add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=6))
    words = model.get_input_embeddings().weight
    assert 0.5 < adapter.prompt_embeddings.std().item() / words.std().item() < 2.0
    model.train()
    batch = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(adapter.adapter_params(), lr=0.1)
    losses = []
    for _ in range(15):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_disabled_and_removed_adapter_give_the_base_model():
    model = tiny_model()
    base = copy.deepcopy(model)
    adapter = add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=3))
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        adapter.disabled = True
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)
        adapter.disabled = False
        assert model(ids, attention_mask=mask).logits.shape[1] == 3 + 7  # positional input_ids too
        adapter.remove()
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)


def test_peft_format_interop_both_ways(tmp_path):
    peft_model, _ours, adapter = peft_and_ours("qwen2")
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
    # PEFT -> fastpeft
    peft_model.save_pretrained(tmp_path / "peft")
    loaded_model = tiny_model("qwen2")
    loaded = load_prompt_adapter(loaded_model, tmp_path / "peft")
    torch.testing.assert_close(loaded.prompt_embeddings, adapter.prompt_embeddings)
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(input_ids=ids, attention_mask=mask).logits, want)
    # fastpeft -> PEFT
    save_prompt_adapter(adapter, tmp_path / "ours")
    peft_loaded = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(peft_loaded(input_ids=ids, attention_mask=mask).logits, want)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="init_text"):
        PromptTuningConfig(4, init="text")
    with pytest.raises(ValueError, match="tokenizer"):
        add_prompt_tuning(tiny_model(), PromptTuningConfig(4, init="text", init_text="the review"))
    _, _, adapter = peft_and_ours("llama")
    save_prompt_adapter(adapter, tmp_path / "a")
    wider = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 32}))
    with pytest.raises(ValueError, match=r"prompt_embeddings .* \(4, 64\) but this model needs \(4, 32\)"):
        load_prompt_adapter(wider, tmp_path / "a")
