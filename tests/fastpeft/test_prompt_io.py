"""Saving and loading prefix adapters: PEFT's format both ways (PEFT 0.21 reads ours, we read
PEFT's, including a reparameterised prefix), our gated format round trip, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import PrefixTuningConfig as PeftPrefixTuningConfig
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from fastpeft import (
    MixedPromptsConfig,
    PrefixTuningConfig,
    add_mixed_prompts,
    add_prefix_tuning,
    load_prompt_adapter,
    save_prompt_adapter,
)

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    return ids, mask


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_peft_reads_our_prefix(tmp_path):
    model = tiny_model()
    config = PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)
    adapter = add_prefix_tuning(model, config)
    save_prompt_adapter(adapter, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "PREFIX_TUNING" and config["token_dim"] == 2 * 16 and config["num_attention_heads"] == 2
    )
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"].shape == (3, 2 * 2 * 2 * 16)
    ids, mask = batch()
    peft_model = PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(logits(peft_model, ids, mask), logits(model, ids, mask), atol=2e-5, rtol=1e-4)


def test_we_read_peft_reparameterised_prefix(tmp_path):
    config = PeftPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True)
    peft_model = get_peft_model(tiny_model(), config)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    ours = tiny_model()
    adapter = load_prompt_adapter(ours, tmp_path)
    assert adapter.num_virtual_tokens == 4 and not adapter.prefix_projection
    ids, mask = batch()
    torch.testing.assert_close(logits(ours, ids, mask), logits(peft_model, ids, mask), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fold", [False, True])
def test_gated_prefix_round_trip(tmp_path, fold):
    model = tiny_model()
    adapter = add_mixed_prompts(model, MixedPromptsConfig(num_virtual_tokens=3, prefix_projection=True))
    with torch.no_grad():
        adapter.gate.log_alpha.copy_(torch.tensor([-10.0, 0.3]))
    if fold:
        adapter.fold()
    save_prompt_adapter(adapter, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "FASTPEFT_GATED_PREFIX" and config["folded"] is fold
    loaded_model = tiny_model()
    loaded = load_prompt_adapter(loaded_model, tmp_path)
    assert loaded.layers == adapter.layers
    if fold:
        assert loaded.gate is None
        torch.testing.assert_close(loaded.folded_logit_bias, adapter.folded_logit_bias)
    else:
        assert loaded.gate.kind == "hard_concrete"
        torch.testing.assert_close(loaded.gate.log_alpha, adapter.gate.log_alpha)
    ids, mask = batch()
    torch.testing.assert_close(logits(loaded_model, ids, mask), logits(model, ids, mask))


def test_load_errors(tmp_path):
    adapter = add_prefix_tuning(tiny_model(), PrefixTuningConfig(num_virtual_tokens=3))
    save_prompt_adapter(adapter, tmp_path / "prefix")
    with pytest.raises(ValueError, match=r"\(2, 2, 16\) but the model has \(3, 2, 16\)"):
        load_prompt_adapter(tiny_model(num_hidden_layers=3), tmp_path / "prefix")
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    (tmp_path / "prefix" / "adapter_model.safetensors").rename(tmp_path / "lora" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="unsupported peft_type 'LORA'"):
        load_prompt_adapter(tiny_model(), tmp_path / "lora")
    torch.save({"prompt_embeddings": torch.zeros(3, 128)}, tmp_path / "prefix" / "adapter_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_prompt_adapter(tiny_model(), tmp_path / "prefix")
    assert load_prompt_adapter(tiny_model(), tmp_path / "prefix", allow_pickle=True).num_virtual_tokens == 3


def test_load_adapter_dispatches_prompt_learning_directories(tmp_path):
    """fastpeft.load_adapter reads a prefix-tuning directory too (one entry point for every type)."""
    import fastpeft

    model = tiny_model()
    adapter = add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    save_prompt_adapter(adapter, tmp_path)
    fresh = tiny_model()
    assert fastpeft.load_adapter(fresh, tmp_path) is fresh
    ids, mask = batch()
    assert torch.allclose(logits(model, ids, mask), logits(fresh, ids, mask), atol=1e-6)
    assert not torch.allclose(logits(tiny_model(), ids, mask), logits(fresh, ids, mask), atol=1e-3)
