"""Delta-LoRA: W moves by exactly λ·s·(B'A' − BA) per optimizer step, merge/unmerge stay
consistent on the updated W, NF4 bases are refused, and the adapter saves as a PEFT LoRA file."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fastpeft import LoraConfig, LoRALinear, inject, load_adapter, merge, save_adapter, unmerge
from fastpeft.delta_lora import DeltaLoraAdapter, DeltaLoraUpdater
from fastpeft.lora_linear import iter_adapter_layers
from fastpeft.qlora_linear import QLoRALinear

TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_weight_moves_by_exactly_the_delta_float64():
    torch.manual_seed(0)
    # float64 runs the unfused path (dropout > 0 in training mode); the update rule is the same
    layer = LoRALinear.wrap(nn.Linear(13, 7, dtype=torch.float64))
    adapter = layer.add_adapter(
        "default",
        3,
        6.0,
        lora_dropout=0.1,
        variant="delta_lora",
        init_lora_weights=False,
        variant_config={"update_ratio": 2.0},
    )
    layer.train()
    model = nn.ModuleDict({"layer": layer})
    updater = DeltaLoraUpdater(model, "default")
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.3)
    for _ in range(2):
        w0, a0, b0 = (t.detach().clone() for t in (layer.weight, adapter.lora_A, adapter.lora_B))
        (layer(torch.randn(5, 13, dtype=torch.float64)) * torch.randn(5, 7, dtype=torch.float64)).sum().backward()
        updater.step(optimizer)
        optimizer.zero_grad()
        expected = 2.0 * (6.0 / 3) * (adapter.lora_B.detach() @ adapter.lora_A.detach() - b0 @ a0)
        assert expected.abs().max() > 1e-3  # the step did move A and B
        torch.testing.assert_close(layer.weight.detach() - w0, expected, atol=1e-12, rtol=0)
    assert not layer.weight.requires_grad
    w = layer.weight.detach().clone()
    updater.before_step()  # a skipped optimizer step (e.g. GradScaler overflow) leaves W bit-exact
    updater.after_step()
    assert torch.equal(layer.weight, w)


def test_training_merge_unmerge_and_save(lm, tmp_path):
    ids = lm.ids()
    model = inject(lm.build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, variant="delta_lora"))
    lm.randomize(model, seed=1, scale=0.1)
    before = {p: layer.weight.detach().clone() for p, layer in iter_adapter_layers(model)}
    updater = DeltaLoraUpdater(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        updater.step(optimizer)
        optimizer.zero_grad()
    for path, layer in iter_adapter_layers(model):
        assert isinstance(layer.adapters["default"], DeltaLoraAdapter)
        assert not torch.equal(layer.weight, before[path]) and layer.weight.grad is None

    # the model computes W_updated + s·B·A (fused op) = a float64 model holding exactly that
    updated = {p: layer.weight.detach().clone() for p, layer in iter_adapter_layers(model)}
    plain = lm.build("llama")  # the same initial weights, then the updated W of the adapted layers
    with torch.no_grad():
        for path, weight in updated.items():
            plain.get_submodule(path).weight.copy_(weight)
    expected = lm.logits(model, ids)
    torch.testing.assert_close(expected.double(), lm.logits(lm.reference(plain, model), ids), atol=1e-4, rtol=1e-4)
    merge(model)
    torch.testing.assert_close(lm.logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        updater.before_step()
    unmerge(model)
    for path, layer in iter_adapter_layers(model):
        torch.testing.assert_close(layer.weight, updated[path], atol=1e-6, rtol=0)

    # the adapter file is plain PEFT LoRA; with the updated base weights it reproduces the model
    save_adapter(model, tmp_path / "delta")
    assert json.loads((tmp_path / "delta/adapter_config.json").read_text())["peft_type"] == "LORA"
    load_adapter(plain, tmp_path / "delta")
    torch.testing.assert_close(lm.logits(plain, ids), expected, atol=1e-5, rtol=1e-5)


def test_nf4_base_is_refused(lm):
    with pytest.raises(ValueError, match=r"delta_lora.*quantize='nf4'"):
        LoraConfig(target_modules=TARGETS, variant="delta_lora", quantize="nf4")
    layer = QLoRALinear.quantize_linear(nn.Linear(64, 16))
    with pytest.raises(ValueError, match=r"Delta-LoRA .* dense"):
        layer.add_adapter("delta", 2, 4.0, variant="delta_lora")
    assert "delta" not in layer.adapters
    # a model whose targets are already NF4 (first adapter injected with quantize="nf4")
    model = inject(lm.build("llama"), LoraConfig(r=2, target_modules=TARGETS, quantize="nf4"))
    with pytest.raises(ValueError, match=r"Delta-LoRA .* QLoRALinear"):
        inject(model, LoraConfig(r=2, target_modules=TARGETS, variant="delta_lora"), "delta")
    assert all(list(layer.adapters) == ["default"] for _, layer in iter_adapter_layers(model) if layer.adapters)


def test_updater_misuse_raises(lm):
    model = inject(lm.build("llama"), LoraConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="no Delta-LoRA adapter named 'default'"):
        DeltaLoraUpdater(model)
    inject(model, LoraConfig(r=2, target_modules=TARGETS, variant="delta_lora"), "delta")
    updater = DeltaLoraUpdater(model)
    assert updater.adapter_name == "delta" and len(updater.layers) == 2 * len(TARGETS)
    with pytest.raises(RuntimeError, match="before_step"):
        updater.after_step()
    with pytest.raises(ValueError, match="update_ratio"):
        LoRALinear.wrap(nn.Linear(4, 4)).add_adapter(
            "x", 2, 4.0, variant="delta_lora", variant_config={"update_ratio": 0}
        )
