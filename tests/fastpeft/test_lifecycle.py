"""set/delete/disable adapters, per-row routing, merge/unmerge and merge_and_unload on whole models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from fastpeft import (
    LoraConfig,
    QLoRALinear,
    active_adapter,
    delete_adapter,
    disable_adapters,
    inject,
    list_adapters,
    merge,
    merge_and_unload,
    route_adapters,
    set_adapter,
    unmerge,
)
from fastpeft.kernels.nf4_dequantize import dequantize_nf4
from fastpeft.lora_linear import AdapterLinear, iter_adapter_layers


def _two_adapters(lm, arch: str = "llama", quantize: str | None = None):
    """A model with a LoRA "policy" on attention and a DoRA "verifier" on the MLP + q_proj, random weights."""
    model = lm.build(arch)
    attn = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    mlp = ["c_fc", "c_attn"] if arch == "gpt2" else ["up_proj", "down_proj", "q_proj"]
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=attn, quantize=quantize), adapter_name="policy")
    inject(model, LoraConfig(r=2, lora_alpha=4, target_modules=mlp, use_dora=True), adapter_name="verifier")
    lm.randomize(model)
    return model


def test_set_delete_and_disable(lm):
    model = _two_adapters(lm)
    ids = lm.ids()
    base = lm.logits(lm.build("llama"), ids)
    assert list_adapters(model) == ["policy", "verifier"] and active_adapter(model) == "verifier"
    verifier = lm.logits(model, ids)
    set_adapter(model, "policy")
    policy = lm.logits(model, ids)
    assert not torch.allclose(policy, verifier) and not torch.allclose(policy, base)
    mlp = model.model.layers[0].mlp.up_proj
    assert mlp.active_adapter is None  # a layer without the active adapter runs its base weight
    with disable_adapters(model):
        torch.testing.assert_close(lm.logits(model, ids), base, atol=0, rtol=0)
    torch.testing.assert_close(lm.logits(model, ids), policy, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"no adapter named 'critic'.*\['policy', 'verifier'\]"):
        set_adapter(model, "critic")
    delete_adapter(model, "policy")
    assert list_adapters(model) == ["verifier"] and active_adapter(model) == "verifier"
    torch.testing.assert_close(lm.logits(model, ids), verifier, atol=0, rtol=0)
    assert not any("policy" in name for name in model.state_dict())


@pytest.mark.parametrize("arch,quantize", [("llama", None), ("gpt2", None), ("qwen2", "nf4")])
def test_route_adapters_equals_separate_runs(arch, quantize, lm):
    model = _two_adapters(lm, arch, quantize)
    ids = lm.ids(batch=4)
    separate = {}
    for name in ("policy", "verifier"):
        set_adapter(model, name)
        separate[name] = lm.logits(model, ids)
    with disable_adapters(model):
        separate[None] = lm.logits(model, ids)
    rows = ["verifier", "policy", None, "policy"]
    with route_adapters(model, rows):
        routed = lm.logits(model, ids)
        with pytest.raises(ValueError, match="4 row adapters"):
            lm.logits(model, ids[:3])
    for i, name in enumerate(rows):
        torch.testing.assert_close(routed[i], separate[name][i], atol=2e-5, rtol=2e-5)
    assert all(layer.row_routing is None for _, layer in iter_adapter_layers(model))
    with (
        pytest.raises(ValueError, match="no adapter named 'critic'"),
        route_adapters(model, ["critic", None, None, None]),
    ):
        pass


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_round_trip(arch, lm):
    model = _two_adapters(lm, arch)
    ids = lm.ids()
    weights = {p: layer.weight.detach().clone() for p, layer in iter_adapter_layers(model)}
    for name in ("policy", "verifier"):  # LoRA, then DoRA
        set_adapter(model, name)
        adapted = lm.logits(model, ids)
        merge(model)
        assert any(layer.merged_adapter == name for _, layer in iter_adapter_layers(model))
        torch.testing.assert_close(lm.logits(model, ids), adapted, atol=1e-4, rtol=1e-4)
        with pytest.raises(RuntimeError, match="merged"), disable_adapters(model):
            pass
        with pytest.raises(RuntimeError, match="unmerge"):
            set_adapter(model, "policy" if name == "verifier" else "verifier")
        unmerge(model)
        for path, layer in iter_adapter_layers(model):
            torch.testing.assert_close(layer.weight, weights[path], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lm.logits(model, ids), adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_dense(arch, lm, tmp_path):
    model = _two_adapters(lm, arch)
    set_adapter(model, "verifier")
    ids = lm.ids()
    adapted = lm.logits(model, ids)
    merged = merge_and_unload(model)
    assert merged is model and not list(iter_adapter_layers(model)) and list_adapters(model) == []
    kinds = {type(m).__name__ for p, m in model.named_modules() if p.endswith(("q_proj", "c_attn", "up_proj"))}
    assert kinds == ({"Conv1D"} if arch == "gpt2" else {"Linear"})
    torch.testing.assert_close(lm.logits(model, ids), adapted, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path)  # a plain transformers model again
    reloaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(lm.logits(reloaded, ids), adapted, atol=1e-4, rtol=1e-4)


def _nf4_base_and_delta(model, adapter_name: str = "default"):
    """{path: (dequantized NF4 base W [out, in], s·B·A of the adapter or None)}, fp32, by hand."""
    out = {}
    for path, layer in iter_adapter_layers(model):
        w = dequantize_nf4(layer.nf4_weight(), torch.float32)
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        delta = None if adapter is None else adapter.scaling * (adapter.lora_B.detach() @ adapter.lora_A.detach())
        out[path] = (w, delta)
    return out


def test_merge_and_unload_nf4(lm, nf4):
    model = lm.build("llama")
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", quantize="nf4"))
    lm.randomize(model, scale=0.1)
    ids = lm.ids()
    adapted = lm.logits(model, ids)
    dense = merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, AdapterLinear) for m in dense.modules())
    assert isinstance(dense.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(lm.logits(dense, ids), adapted, atol=1e-4, rtol=1e-4)

    merged = {path: w if delta is None else w + delta for path, (w, delta) in _nf4_base_and_delta(model).items()}
    expected = {path: nf4.bnb(w) for path, w in merged.items()}  # re-quantization is deterministic
    requantized, error = merge_and_unload(model, requantize=True)
    for path, want in expected.items():
        layer = requantized.get_submodule(path)
        assert isinstance(layer, QLoRALinear) and not layer.adapters
        nf4.assert_same(layer.nf4_weight(), want)
    # the reported error is the largest change re-quantization made to any merged weight
    assert error == max((dequantize_nf4(expected[p], torch.float32) - w).abs().max().item() for p, w in merged.items())


def test_merge_nf4_layers_warns_and_unmerge_requantizes_again(lm, nf4):
    model = lm.build("llama")
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], quantize="nf4"))
    lm.randomize(model, scale=0.1)
    before = {path: wd for path, wd in _nf4_base_and_delta(model).items() if wd[1] is not None}  # the q_projs
    assert len(before) == 2
    with pytest.warns(UserWarning, match="re-quantizes"):
        merge(model)
    for path, (w, delta) in before.items():
        nf4.assert_same(model.get_submodule(path).nf4_weight(), nf4.bnb(w + delta))
    merged = {path: dequantize_nf4(model.get_submodule(path).nf4_weight(), torch.float32) for path in before}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unmerge(model)
    assert all(layer.merged_adapter is None for _, layer in iter_adapter_layers(model))
    for path, (_, delta) in before.items():
        nf4.assert_same(model.get_submodule(path).nf4_weight(), nf4.bnb(merged[path] - delta))
