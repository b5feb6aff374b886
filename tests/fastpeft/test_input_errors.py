"""Bad arguments to the adapter API are clear errors at the call, not surprises later: a model that
is not a module, a string where a bool belongs (``"no"`` is truthy), NaN/inf in a loaded file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft import PromptTuningConfig, add_prompt_tuning


def test_inject_and_load_need_a_module(tmp_path):
    with pytest.raises(TypeError, match=r"inject expects a torch nn.Module .* got str"):
        fastpeft.inject("model", fastpeft.LoraConfig())
    with pytest.raises(TypeError, match=r"load_adapter expects a torch nn\.Module, got str"):
        fastpeft.load_adapter("model", tmp_path)


@pytest.mark.parametrize("field", ["double_quant", "use_rslora", "use_dora", "fan_in_fan_out"])
@pytest.mark.parametrize("value", ["no", "false", 1, None])
def test_lora_config_bool_fields_take_only_bools(field, value):
    with pytest.raises(ValueError, match=f"LoraConfig.{field} must be True or False, got {value!r}"):
        fastpeft.LoraConfig(**{field: value})
    assert fastpeft.LoraConfig(**{field: False}).variant == "lora"


def test_nan_in_a_loaded_lora_adapter_is_reported_at_load_time(lm, tmp_path):
    model = lm.build("llama")
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    fastpeft.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    fresh = lm.build("llama")
    with pytest.raises(ValueError, match=f"key {key}: the adapter file holds NaN/inf"):
        fastpeft.load_adapter(fresh, tmp_path)
    assert fastpeft.list_adapters(fresh) == []  # the model is unchanged


def test_nan_in_a_loaded_prompt_adapter_is_reported_at_load_time(lm, tmp_path):
    model = lm.build("llama")
    adapter = add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=2))
    with torch.no_grad():
        adapter.prompt_embeddings[1, 3] = float("nan")
    fastpeft.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"prompt_embeddings .* holds NaN/inf"):
        fastpeft.load_adapter(lm.build("llama"), tmp_path)
