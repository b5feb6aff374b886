"""save_adapter / load_adapter: exact round trips, PEFT key layout, and every bad file rejected cleanly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastpeft import LoraConfig, inject, list_adapters, load_adapter, save_adapter
from fastpeft.lora_linear import iter_adapter_layers

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")


def _trained(lm, arch: str, variant: str = "lora", **config):
    model = lm.build(arch)
    inject(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=config.pop("target_modules", "all-linear"),
            use_rslora=variant == "rslora",
            use_dora=variant == "dora",
            **config,
        ),
    )
    lm.randomize(model)
    return model


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys() and all(torch.equal(v, snapshot[k]) for k, v in state.items())


@pytest.mark.parametrize("arch,variant", [(a, "lora") for a in ARCHS] + [("llama", "rslora"), ("gpt2", "dora")])
def test_round_trip_is_exact(arch, variant, lm, tmp_path):
    model = _trained(lm, arch, variant)
    ids = lm.ids()
    expected = lm.logits(model, ids)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    n_layers = len(list(iter_adapter_layers(model)))
    assert len(tensors) == n_layers * (3 if variant == "dora" else 2)
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in tensors)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["use_rslora"] == (variant == "rslora") and config["use_dora"] == (variant == "dora")
    assert config["fan_in_fan_out"] == (arch == "gpt2") and isinstance(config["target_modules"], list)

    fresh = lm.build(arch)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(lm.logits(fresh, ids), expected, atol=0, rtol=0)
    assert list_adapters(fresh) == ["default"] and not any(p.requires_grad for p in fresh.parameters())
    load_adapter(fresh, tmp_path, adapter_name="trainable", is_trainable=True)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.trainable." in n for n in trainable)


def test_pickle_refused_unless_opted_in(lm, tmp_path):
    model = _trained(lm, "llama", target_modules=["q_proj"])
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    fresh = lm.build("llama")
    snapshot = _snapshot(fresh)
    with pytest.raises(ValueError, match=r"pickle.*allow_pickle=True"):
        load_adapter(fresh, tmp_path)
    _assert_unchanged(fresh, snapshot)
    load_adapter(fresh, tmp_path, allow_pickle=True)
    ids = lm.ids()
    torch.testing.assert_close(lm.logits(fresh, ids), lm.logits(model, ids), atol=0, rtol=0)


def _corrupt(directory, mutate) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)


P = "base_model.model."
Q_A1 = "layers.1.self_attn.q_proj.lora_A.weight"
Q_B0 = "layers.0.self_attn.q_proj.lora_B.weight"
GPT2_A, GPT2_B = P + "transformer.h.0.attn.c_attn.lora_A.weight", P + "transformer.h.0.attn.c_attn.lora_B.weight"
BAD_FILES = {
    "truncated": (None, r"truncated or corrupted"),
    "wrong_shape": (
        lambda t: t.update({k: torch.zeros(5, 64) for k in t if k.endswith(Q_A1)}),
        r"key .*layers\.1\.self_attn\.q_proj\.lora_A\.weight: shape \(5, 64\) .* model's \(4, 64\)",
    ),
    "missing_B": (
        lambda t: [t.pop(k) for k in list(t) if k.endswith(Q_B0)],
        r"layers\.0\.self_attn\.q_proj: missing keys \['lora_B.weight'\]",
    ),
    "unknown_key": (lambda t: t.update({P + "model.norm.scale": torch.ones(64)}), r"key .*model\.norm\.scale"),
    "foreign_module": (
        lambda t: t.update({GPT2_A: torch.ones(4, 64), GPT2_B: torch.ones(192, 4)}),
        r"transformer\.h\.0\.attn\.c_attn' does not exist.*another architecture",
    ),
    "integer_dtype": (
        lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if "layers.0" in k}),
        r"dtype torch.int32",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_adapter_files_leave_model_unchanged(case, lm, tmp_path):
    mutate, message = BAD_FILES[case]
    save_adapter(_trained(lm, "llama", target_modules=["q_proj", "v_proj"]), tmp_path)
    if mutate is None:
        path = tmp_path / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
    else:
        _corrupt(tmp_path, mutate)
    fresh = lm.build("llama")
    inject(fresh, LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"]), adapter_name="existing")
    snapshot = _snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh, tmp_path, adapter_name="new")
    _assert_unchanged(fresh, snapshot)
    assert list_adapters(fresh) == ["existing"]


def test_adapter_for_another_architecture_is_rejected(lm, tmp_path):
    save_adapter(_trained(lm, "gpt2"), tmp_path)
    model = lm.build("llama")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\..* does not exist in this model"):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"peft_type": "ADALORA"}, "peft_type 'ADALORA'"),
        ({"r": 0}, "LoraConfig.r must be a positive int, got 0"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"lora_bias": True}, "lora_bias"),
    ],
)
def test_bad_configs_rejected(edit, message, lm, tmp_path):
    save_adapter(_trained(lm, "llama", target_modules=["q_proj"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    model = lm.build("llama")
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(model, tmp_path)
    assert not list(iter_adapter_layers(model))


def test_bias_and_modules_to_save_round_trip(lm, tmp_path):
    model = _trained(lm, "qwen2", target_modules=["q_proj", "v_proj"], bias="lora_only", modules_to_save=["lm_head"])
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.add_(0.3)
        model.lm_head.copies["default"].weight.mul_(1.5)
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert "base_model.model.lm_head.weight" in keys
    fresh = lm.build("qwen2")
    load_adapter(fresh, tmp_path)
    ids = lm.ids()
    torch.testing.assert_close(lm.logits(fresh, ids), lm.logits(model, ids), atol=0, rtol=0)


def test_load_onto_nf4_model_and_save_from_it(lm, tmp_path):
    model = _trained(lm, "llama", target_modules=["q_proj", "v_proj"])
    save_adapter(model, tmp_path / "a")
    quantized = lm.build("llama")
    load_adapter(quantized, tmp_path / "a", quantize="nf4")
    layer = quantized.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "QLoRALinear"
    assert torch.equal(layer.lora_A, model.model.layers[0].self_attn.q_proj.lora_A)
    save_adapter(quantized, tmp_path / "b")
    first = load_file(tmp_path / "a" / "adapter_model.safetensors")
    second = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
