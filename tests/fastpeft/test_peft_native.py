"""fastpeft-injected models in the HF/PEFT stack: save_pretrained writes PEFT-format adapters that
reload to identical logits, the trainable shard a Trainer resume needs, base-layer probes, and the
tensor-sharing conversion to a real PeftModel."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft import LoraConfig, inject, load_adapter

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def injected(kit, quantize=None, double_quant=True, variant="lora", **kw):
    model = kit.tiny_llama()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=kit.LLAMA_LINEARS,
        quantize=quantize,
        double_quant=double_quant,
        use_dora=variant == "dora",
        init_lora_weights=False,
        **kw,
    )
    return inject(model, config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "quantize,double_quant,variant",
    [(None, True, "lora"), (None, True, "dora"), ("nf4", True, "lora"), ("nf4", False, "dora")],
)
def test_save_pretrained_reloads_identical_logits(peft_kit, tmp_path, quantize, double_quant, variant):
    ids = peft_kit.token_ids()
    model = injected(peft_kit, quantize, double_quant, variant, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.copies["default"].weight.mul_(1.1)
    want = logits(model, ids)
    model.save_pretrained(tmp_path)  # QLoRA: no shared-tensor error on nested_code
    files = {p.name for p in tmp_path.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "fastpeft_trainable.safetensors",
        "model.safetensors.index.json",
    } <= files and "model.safetensors" not in files
    assert ("fastpeft_config.json" in files) == (quantize is not None)
    reloaded = load_adapter(peft_kit.tiny_llama().eval(), tmp_path)  # the documented call
    torch.testing.assert_close(logits(reloaded, ids), want, atol=0, rtol=0)
    if quantize is None:  # and PEFT reads the same directory
        theirs = peft.PeftModel.from_pretrained(peft_kit.tiny_llama().eval(), tmp_path).eval()
        torch.testing.assert_close(logits(theirs, ids), want, atol=2e-5, rtol=2e-5)
    # the resume shard: the model's own keys, adapters and trainable tensors only, enough to restore the state
    shard = load_file(tmp_path / "fastpeft_trainable.safetensors")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(shard) and all(".adapters." in k or ".copies." in k for k in shard)
    fresh = injected(peft_kit, quantize, double_quant, variant, modules_to_save=["lm_head"])
    result = fresh.load_state_dict(shard, strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(fresh, ids), want, atol=0, rtol=0)


def test_save_pretrained_of_a_bnb_4bit_model(peft_kit, tmp_path):
    ids = peft_kit.token_ids()
    peft_kit.tiny_llama().save_pretrained(tmp_path / "base")
    model = peft_kit.no_repack(peft_kit.load_4bit(tmp_path / "base", double_quant=False))
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=peft_kit.LLAMA_LINEARS, init_lora_weights=False))
    want = logits(model.train(), ids)
    model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "fastpeft_config.json").exists()  # bnb's own base: nothing to record
    reloaded = load_adapter(peft_kit.load_4bit(tmp_path / "base", double_quant=False), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded.train(), ids), want, atol=0, rtol=0)


def test_several_adapters_and_merged_models(peft_kit, tmp_path):
    ids = peft_kit.token_ids()
    model = injected(peft_kit)
    inject(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False), "other")
    model.save_pretrained(tmp_path / "two")
    assert (tmp_path / "two/adapter_config.json").exists() and (tmp_path / "two/other/adapter_config.json").exists()
    fastpeft.set_adapter(model, "default")
    want = logits(model, ids)
    fastpeft.merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")  # no adapters left: a plain transformers checkpoint
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-5, rtol=1e-5)


def test_what_an_adapter_directory_cannot_hold_is_refused(peft_kit, tmp_path):
    model = peft_kit.tiny_llama()
    inject(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], variant="delta_lora"))
    with pytest.raises(ValueError, match="Delta-LoRA"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="push_to_hub"):
        injected(peft_kit).save_pretrained(tmp_path, push_to_hub=True)
    assert not any(tmp_path.iterdir())


def test_layers_expose_base_layer_and_weight(peft_kit):
    bnb = pytest.importorskip("bitsandbytes")
    dense = injected(peft_kit).model.layers[0].self_attn.q_proj
    base = dense.get_base_layer()
    assert isinstance(base, torch.nn.Linear) and base.weight is dense.weight and dense.base_layer.weight is dense.weight
    nf4 = injected(peft_kit, "nf4").model.layers[0].mlp.down_proj
    assert isinstance(nf4.base_layer, bnb.nn.Linear4bit) and nf4.weight.quant_state.shape == (64, 128)
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(nf4.get_base_layer()(x), nf4.base_linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_as_peft_model_shares_tensors(peft_kit, tmp_path, quantize):
    ids = peft_kit.token_ids()
    model = injected(peft_kit, quantize, variant="dora", modules_to_save=["lm_head"])
    inject(model, LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False), "second")
    fastpeft.set_adapter(model, "default")
    with fastpeft.disable_adapters(model):
        base_logits = logits(model, ids)
    want = logits(model, ids)
    layer = model.model.layers[0].self_attn.q_proj
    lora_a, magnitude = layer.adapters["default"].lora_A, layer.adapters["default"].magnitude
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    peft_model = fastpeft.as_peft_model(model)
    assert isinstance(peft_model, peft.PeftModel) and peft_model.active_adapter == "default"
    peft_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert (
        peft_layer.lora_A["default"].weight is lora_a
        and peft_layer.lora_magnitude_vector["default"].weight is magnitude
    )
    assert len([p for p in peft_model.parameters() if p.requires_grad]) == len(trainable)
    assert len(peft_model.fastpeft_patch_report.patched) == 14
    torch.testing.assert_close(logits(peft_model, ids), want, atol=1e-6, rtol=1e-6)
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, ids), base_logits, atol=1e-6, rtol=1e-6)
    peft_model.save_pretrained(tmp_path)  # PEFT's own saving (+ fastpeft_config.json for our NF4 base)
    assert (tmp_path / "second/adapter_config.json").exists()
    assert (tmp_path / "fastpeft_config.json").exists() == (quantize == "nf4")
    reloaded = load_adapter(peft_kit.tiny_llama().eval(), tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), want, atol=1e-5, rtol=1e-5)


def test_as_peft_model_refuses_what_peft_cannot_hold(peft_kit):
    with pytest.raises(ValueError, match="no fastpeft adapters") as err:
        fastpeft.as_peft_model(peft_kit.tiny_llama())
    assert "\n" not in str(err.value)
    model = peft_kit.tiny_llama()
    inject(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], variant="delta_lora"))
    with pytest.raises(ValueError, match="delta_lora"):
        fastpeft.as_peft_model(model)
    merged = injected(peft_kit)
    fastpeft.merge(merged)
    with pytest.raises(ValueError, match="merged"):
        fastpeft.as_peft_model(merged)


@pytest.mark.parametrize("double_quant", [False, True])
def test_inject_after_bitsandbytes_cpu_repack(peft_kit, tmp_path, double_quant):
    """The issue's case: inject after bnb's CPU eval forward repacked every Linear4bit. The wrapped
    model computes with the block scales bnb kept (fp32 absmax rounded to bf16), on the original codes."""
    ids = peft_kit.token_ids()
    peft_kit.tiny_llama().save_pretrained(tmp_path)
    model = peft_kit.load_4bit(tmp_path, double_quant)
    reference = peft_kit.bf16_scale_reference(model)  # unpatched bnb, standard layout, bf16-rounded scales
    peft_kit.repack_like_bitsandbytes(model, ids)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=peft_kit.LLAMA_LINEARS))  # B = 0: the base only
    torch.testing.assert_close(logits(model.train(), ids), logits(reference.train(), ids), atol=1e-5, rtol=1e-5)


def test_transformers_from_pretrained_of_an_adapter_directory(peft_kit, tmp_path):
    """With the base's path recorded, transformers' own from_pretrained loads base + adapter (through
    PEFT) to the same logits (a directory holds no base weights, so nothing loads as random)."""
    from transformers import AutoModelForCausalLM

    ids = peft_kit.token_ids()
    peft_kit.tiny_llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=peft_kit.LLAMA_LINEARS, init_lora_weights=False))
    want = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, ids), want, atol=2e-5, rtol=2e-5)
    assert not (tmp_path / "adapter" / "config.json").exists()
