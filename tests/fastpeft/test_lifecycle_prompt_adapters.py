"""Prompt-learning adapters belong to the adapter lifecycle: listed, disabled with the rest (a DPO
reference pass must not keep the prompt), saved and deleted through the same calls as LoRA."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft import (
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningV2Config,
    add_prefix_tuning,
    add_prompt_tuning,
    add_ptuning_v2,
)

ATTACH = {
    "prompt": (lambda m: add_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=3)), "fastpeft_prompt"),
    "prefix": (lambda m: add_prefix_tuning(m, PrefixTuningConfig(num_virtual_tokens=3)), "fastpeft_prefix"),
    "ptuning_v2": (lambda m: add_ptuning_v2(m, PTuningV2Config(num_virtual_tokens=3)), "fastpeft_prefix"),
}


def _with_prompt(lm, kind):
    model = lm.build("llama")
    base = lm.logits(model, lm.ids())
    attach, name = ATTACH[kind]
    adapter = attach(model)
    with torch.no_grad():
        for p in adapter.adapter_params():
            p.add_(torch.randn_like(p))  # a trained-looking adapter: changes the output
    # prompt tuning prepends its virtual tokens to the logits too: compare the real positions
    assert not torch.allclose(lm.logits(model, lm.ids())[:, -base.shape[1] :], base, atol=1e-4)
    return model, base, name


@pytest.mark.parametrize("kind", sorted(ATTACH))
def test_disable_adapters_turns_prompt_adapters_off(lm, kind):
    model, base, _ = _with_prompt(lm, kind)
    with_prompt = lm.logits(model, lm.ids())
    with fastpeft.disable_adapters(model):
        torch.testing.assert_close(lm.logits(model, lm.ids()), base)
    torch.testing.assert_close(lm.logits(model, lm.ids()), with_prompt)


@pytest.mark.parametrize("kind", sorted(ATTACH))
def test_prompt_adapters_are_listed_saved_and_deleted(lm, kind, tmp_path):
    model, base, name = _with_prompt(lm, kind)
    assert fastpeft.list_adapters(model) == [name] and fastpeft.active_adapter(model) == name
    expected = lm.logits(model, lm.ids())
    fastpeft.save_adapter(model, tmp_path / "a")  # the active (prompt) adapter
    fastpeft.save_adapter(model, tmp_path / "b", adapter_name=name)
    fresh = lm.build("llama")
    fastpeft.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(lm.logits(fresh, lm.ids()), expected)
    with pytest.raises(ValueError, match="prompt adapter"):
        fastpeft.set_adapter(model, name)
    fastpeft.delete_adapter(model, name)
    assert fastpeft.list_adapters(model) == []
    torch.testing.assert_close(lm.logits(model, lm.ids()), base)


def test_lora_and_a_prompt_adapter_together(lm):
    model, base, name = _with_prompt(lm, "prompt")
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    lm.randomize(model)
    assert fastpeft.list_adapters(model) == ["default", name] and fastpeft.active_adapter(model) == "default"
    with fastpeft.disable_adapters(model):  # both off: the base model
        torch.testing.assert_close(lm.logits(model, lm.ids()), base)
