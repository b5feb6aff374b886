"""inject / LoraConfig on tiny Llama, Qwen2, Qwen3, Mistral, Gemma and GPT-2 models."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from fastpeft import LoraConfig, LoRALinear, QLoRALinear, inject, trainable_parameters
from fastpeft.lora_linear import iter_adapter_layers
from fastpeft.modules_to_save import ModulesToSave

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")
CASES = [(arch, "lora") for arch in ARCHS] + [("llama", "rslora"), ("qwen3", "dora"), ("gpt2", "dora")]


def _config(variant: str = "lora", **kw) -> LoraConfig:
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=kw.pop("target_modules", "all-linear"),
        use_rslora=variant == "rslora",
        use_dora=variant == "dora",
        **kw,
    )


def _adapted_paths(model: nn.Module, name: str = "default") -> list[str]:
    return [p for p, layer in iter_adapter_layers(model) if name in layer.adapters]


@pytest.mark.parametrize("arch,variant", CASES)
def test_noop_at_init_then_matches_float64_reference(arch, variant, lm):
    model = lm.build(arch)
    base = copy.deepcopy(model)
    ids = lm.ids()
    before = lm.logits(model, ids)
    inject(model, _config(variant))
    exact = variant != "dora" and arch != "gpt2"  # Conv1D sums in another order than our [out, in] matmul
    torch.testing.assert_close(lm.logits(model, ids), before, atol=0 if exact else 1e-5, rtol=0 if exact else 1e-5)
    layers = dict(iter_adapter_layers(model))
    assert layers and all(type(layer) is LoRALinear for layer in layers.values())
    head = model.get_output_embeddings()
    assert not isinstance(head, LoRALinear) and not any(p.endswith("lm_head") for p in layers)
    if arch == "gpt2":
        assert all(layer.fan_in_fan_out for layer in layers.values())
    lm.randomize(model)
    reference = lm.reference(base, model)
    torch.testing.assert_close(lm.logits(model, ids).double(), lm.logits(reference, ids), atol=2e-4, rtol=2e-4)


def test_target_matching_rules(lm):
    model = lm.build("llama", num_layers=4)
    cases = {
        "list": (dict(target_modules=["q_proj", "v_proj"]), lambda p: p.endswith(("q_proj", "v_proj"))),
        "regex": (dict(target_modules=r".*\.mlp\.(up|down)_proj"), lambda p: p.endswith(("up_proj", "down_proj"))),
        "exclude": (dict(exclude_modules=["o_proj", "gate_proj"]), lambda p: not p.endswith(("o_proj", "gate_proj"))),
        "layers": (
            dict(target_modules=["q_proj"], layers_to_transform=[1, 3], layers_pattern="layers"),
            lambda p: p.endswith("q_proj") and (".1." in p or ".3." in p),
        ),
        "last_10pct": (dict(last_layers_fraction=0.1), lambda p: ".layers.3." in p),
        "last_half": (dict(last_layers_fraction=0.5), lambda p: ".layers.2." in p or ".layers.3." in p),
    }
    all_linear = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and not p.endswith("lm_head")]
    for name, (fields, expected) in cases.items():
        fields = {"target_modules": "all-linear", **fields}
        fresh = copy.deepcopy(model)
        inject(fresh, LoraConfig(r=2, lora_alpha=4, **fields))
        assert _adapted_paths(fresh) == [p for p in all_linear if expected(p)], name


def test_gpt2_all_linear_skips_tied_lm_head(lm):
    model = lm.build("gpt2")
    inject(model, _config())
    leaves = sorted({p.rpartition(".")[2] for p in _adapted_paths(model)})
    assert leaves == ["c_attn", "c_fc", "c_proj"]
    assert model.lm_head.weight is model.transformer.wte.weight


def test_no_match_lists_linear_names_and_leaves_model_unchanged(lm):
    model = lm.build("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"matched no module.*'down_proj'.*'q_proj'"):
        inject(model, LoraConfig(target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match=r"none in blocks \[7\]"):
        inject(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=7))
    with pytest.raises(ValueError, match=r"modules_to_save \['score'\]"):
        inject(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    assert not list(iter_adapter_layers(model)) and model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("r", 0, "r must be a positive int"),
        ("r", -3, "r must be"),
        ("lora_alpha", 0, "lora_alpha"),
        ("lora_dropout", 1.0, "lora_dropout"),
        ("target_modules", [], "target_modules"),
        ("bias", "some", "bias"),
        ("quantize", "int8", "quantize"),
        ("init_lora_weights", "pissa", "init_lora_weights"),
        ("variant", "adalora", "total_step"),
        ("variant", "vera", "variant"),
        ("last_layers_fraction", 1.5, "last_layers_fraction"),
        ("layers_to_transform", [-1], "layers_to_transform"),
        ("compute_dtype", "int8", "compute_dtype"),
        ("blocksize", 48, "blocksize"),
        ("task_type", "SEQ_CLS", "task_type"),
    ],
)
def test_config_validation_names_field(field, value, message):
    with pytest.raises(ValueError, match=message) as info:
        LoraConfig(**{field: value})
    assert repr(value) in str(info.value) or field == "variant"


def test_freezing_report_and_second_adapter(lm):
    model = lm.build("qwen2")
    inject(model, _config(target_modules=["q_proj", "v_proj"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n or n.endswith(("q_proj.bias", "v_proj.bias")) for n in trainable)
    assert any(n.endswith("q_proj.bias") for n in trainable)
    report = trainable_parameters(model)
    lora = sum(4 * (layer.in_features + layer.out_features) for _, layer in iter_adapter_layers(model))
    biases = sum(layer.out_features for _, layer in iter_adapter_layers(model))
    assert report.trainable == lora + biases
    assert report.total == sum(p.numel() for p in model.parameters()) and "trainable%" in str(report)

    ids = lm.ids()
    lm.randomize(model)
    first = lm.logits(model, ids)
    inject(model, _config(target_modules=["q_proj", "v_proj"]), adapter_name="second")
    assert _adapted_paths(model, "second") == _adapted_paths(model, "default")
    assert all(layer.active_adapter == "second" for _, layer in iter_adapter_layers(model))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    from fastpeft import set_adapter

    set_adapter(model, "default")
    torch.testing.assert_close(lm.logits(model, ids), first, atol=0, rtol=0)
    with pytest.raises(ValueError, match="already exists"):
        inject(model, _config(target_modules=["q_proj"]), adapter_name="second")


def test_modules_to_save_copy_is_trained_and_disable_restores_original(lm):
    from fastpeft import disable_adapters

    model = lm.build("llama")
    ids = lm.ids()
    before = lm.logits(model, ids)
    inject(model, _config(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, ModulesToSave)
    copy_weight = model.lm_head.copies["default"].weight
    assert copy_weight.requires_grad and not model.lm_head.original.weight.requires_grad
    with torch.no_grad():
        copy_weight.add_(0.5)
    assert not torch.allclose(lm.logits(model, ids), before)
    with disable_adapters(model):
        torch.testing.assert_close(lm.logits(model, ids), before, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantize_nf4_layer_by_layer(arch, lm):
    model = lm.build(arch)
    base = copy.deepcopy(model)
    ids = lm.ids()
    dense = {p: weakref.ref(m.weight) for p, m in model.named_modules() if p and hasattr(m, "nf")}
    dense.update(
        {
            p: weakref.ref(m.weight)
            for p, m in model.named_modules()
            if isinstance(m, nn.Linear) and not p.endswith("lm_head")
        }
    )
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, quantize="nf4", double_quant=True))
    gc.collect()
    assert all(ref() is None for ref in dense.values()), "a dense weight survived quantization"
    layers = dict(iter_adapter_layers(model))
    assert set(layers) == set(dense) and all(isinstance(m, QLoRALinear) for m in layers.values())
    assert sorted({p.rpartition(".")[2] for p, m in layers.items() if m.adapters}) == sorted(targets)
    assert not [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and not p.endswith("lm_head")]
    lm.randomize(model)
    reference = lm.reference(base, model)  # NF4 values written out in float64
    torch.testing.assert_close(lm.logits(model, ids).double(), lm.logits(reference, ids), atol=2e-4, rtol=2e-4)


def test_bitsandbytes_model_is_wrapped_without_requantizing(lm, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lm.build("llama", intermediate_size=128).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu").eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    pointer = q_proj.weight.data.data_ptr()
    ids = lm.ids()
    inject(model, _config(target_modules=["q_proj", "v_proj"]))
    wrapped = model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, QLoRALinear) and wrapped.packed.data_ptr() == pointer
    assert isinstance(model.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    # train mode (no dropout in this config): bnb's eval-mode CPU kernel rounds absmax to bf16
    reference.train()
    torch.testing.assert_close(lm.logits(model.train(), ids), lm.logits(reference, ids), atol=1e-5, rtol=1e-5)
    report = trainable_parameters(model)
    assert 0 < report.trainable < report.total
