"""PEFT interop both ways: a PEFT ``save_pretrained`` directory loads in fastpeft and a fastpeft one
loads with ``peft.PeftModel.from_pretrained``, giving the same outputs on the same inputs."""

from __future__ import annotations

import json

import pytest
import torch

from fastpeft import LoraConfig, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")
# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")
CASES = [(a, "lora") for a in ARCHS] + [("llama", "rslora"), ("mistral", "dora"), ("gpt2", "dora")]
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_config(arch: str, variant: str, **kw):
    kw.setdefault("target_modules", TARGETS.get(arch, LLAMA_LIKE))
    return peft.LoraConfig(
        r=4,
        lora_alpha=8,
        task_type="CAUSAL_LM",
        use_rslora=variant == "rslora",
        use_dora=variant == "dora",
        init_lora_weights=False,
        fan_in_fan_out=arch == "gpt2",
        **kw,
    )


@torch.no_grad()
def _perturb_peft_magnitudes(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name:
            param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("arch,variant", CASES)
def test_both_directions_same_outputs(arch, variant, lm, tmp_path):
    ids = lm.ids()
    # PEFT -> fastpeft
    peft_model = peft.get_peft_model(lm.build(arch), _peft_config(arch, variant)).eval()
    _perturb_peft_magnitudes(peft_model)
    expected = lm.logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "from_peft")
    ours = lm.build(arch)
    load_adapter(ours, tmp_path / "from_peft")
    torch.testing.assert_close(lm.logits(ours, ids), expected, atol=2e-5, rtol=2e-5)

    # fastpeft -> PEFT
    ours = lm.build(arch)
    inject(
        ours,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=TARGETS.get(arch, LLAMA_LIKE),
            use_rslora=variant == "rslora",
            use_dora=variant == "dora",
        ),
    )
    lm.randomize(ours, seed=3)
    expected = lm.logits(ours, ids)
    save_adapter(ours, tmp_path / "from_fastpeft")
    loaded = peft.PeftModel.from_pretrained(lm.build(arch), tmp_path / "from_fastpeft").eval()
    torch.testing.assert_close(lm.logits(loaded, ids), expected, atol=2e-5, rtol=2e-5)


def test_config_keys_match_what_peft_writes(lm, tmp_path):
    peft.get_peft_model(lm.build("llama"), _peft_config("llama", "lora")).save_pretrained(tmp_path / "peft")
    ours = lm.build("llama")
    inject(ours, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LIKE))
    save_adapter(ours, tmp_path / "ours")
    theirs = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    mine = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert set(theirs) - {"peft_version"} == set(mine)
    for key in ("peft_type", "task_type", "r", "lora_alpha", "bias", "use_dora", "use_rslora", "fan_in_fan_out"):
        assert mine[key] == theirs[key], key
    assert sorted(mine["target_modules"]) == sorted(theirs["target_modules"])


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_and_modules_to_save_interop(bias, lm, tmp_path):
    ids = lm.ids()
    config = _peft_config("qwen2", "lora", bias=bias, modules_to_save=["lm_head"], target_modules=["q_proj", "o_proj"])
    peft_model = peft.get_peft_model(lm.build("qwen2"), config).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "lora_" not in name:  # the biases and the lm_head copy
                param.add_(0.1 * torch.randn_like(param))
    expected = lm.logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = lm.build("qwen2")
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(lm.logits(ours, ids), expected, atol=2e-5, rtol=2e-5)
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(lm.build("qwen2"), tmp_path / "ours").eval()
    torch.testing.assert_close(lm.logits(back, ids), expected, atol=2e-5, rtol=2e-5)


def test_qlora_on_bitsandbytes_model_matches_peft(lm, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lm.build("llama", intermediate_size=128).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )

    def load():
        # train mode (the config has no dropout): bnb's eval-mode CPU kernel rounds absmax to bf16
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")

    ids = lm.ids()
    peft_model = peft.get_peft_model(load(), _peft_config("llama", "lora")).train()
    expected = lm.logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = load().train()
    load_adapter(ours, tmp_path / "adapter")
    assert type(ours.model.layers[0].mlp.down_proj).__name__ == "QLoRALinear"
    torch.testing.assert_close(lm.logits(ours, ids), expected, atol=2e-5, rtol=2e-5)
