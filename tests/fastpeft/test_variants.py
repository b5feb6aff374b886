"""The variant registry: one call registers a variant; duplicates and contradictory configs are refused."""

from __future__ import annotations

import pytest
from torch import nn

from fastpeft import LoraConfig, LoRALinear, inject, variants
from fastpeft.adalora import AdaLoraAdapter
from fastpeft.adapters import LoraAdapter


class GainLoraAdapter(LoraAdapter):
    """LoRA whose scaling is multiplied by a ``gain`` setting (a toy variant for the registry)."""

    def __init__(
        self,
        in_features,
        out_features,
        r,
        lora_alpha,
        lora_dropout=0.0,
        use_rslora=False,
        init_lora_weights=True,
        *,
        dtype=None,
        device=None,
        gain: float = 1.0,
    ):
        super().__init__(
            in_features,
            out_features,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            init_lora_weights,
            dtype=dtype,
            device=device,
        )
        self.gain = gain

    @property
    def scaling(self) -> float:
        return self.gain * super().scaling


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test."""
    monkeypatch.setattr(variants, "_REGISTRY", dict(variants._REGISTRY))
    return variants


def test_one_call_registers_a_variant_for_config_layers_and_files(registry, lm):
    seen = []
    registry.register_variant("gain", GainLoraAdapter, normalize=lambda config: seen.append(config.variant_config))
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj"],
        variant="gain",
        variant_config={"gain": 3.0},
        init_lora_weights=False,
    )
    assert seen == [{"gain": 3.0}] and "gain" in registry.variant_names()
    with pytest.raises(ValueError, match=r"unknown keys \['gian'\] for variant 'gain'; known: \['gain'\]"):
        LoraConfig(variant="gain", variant_config={"gian": 3.0})
    model = inject(lm.build("llama"), config)
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert type(adapter) is GainLoraAdapter and adapter.variant == "gain" and adapter.scaling == 3.0 * 4 / 2
    assert config.to_peft_dict()["peft_type"] == "LORA"
    assert registry.get_variant("gain").peft_shapes(2, 64, 32) == {"lora_A.weight": (2, 64), "lora_B.weight": (32, 2)}


def test_duplicates_are_refused(registry):
    with pytest.raises(ValueError, match="'adalora' is already registered"):
        registry.register_variant("adalora", GainLoraAdapter)
    with pytest.raises(ValueError, match="AdaLoraAdapter is already the adapter of variant 'adalora'"):
        registry.register_variant("adalora2", AdaLoraAdapter)
    with pytest.raises(ValueError, match="peft_type 'ADALORA' is already read by 'adalora'"):
        registry.register_variant("gain", GainLoraAdapter, peft_type="ADALORA", from_peft=lambda data: (data, {}))
    with pytest.raises(ValueError, match="no from_peft"):
        registry.register_variant("gain", GainLoraAdapter, peft_type="GAIN")
    with pytest.raises(TypeError, match="LoraAdapter subclass"):
        registry.register_variant("linear", nn.Linear)
    assert "gain" not in registry.variant_names()


@pytest.mark.parametrize("variant", ["adalora", "delta_lora"])
def test_use_dora_with_another_variant_is_refused(variant):
    with pytest.raises(ValueError, match=f"use_dora=True selects the DoRA variant.*variant='{variant}'"):
        LoraConfig(use_dora=True, variant=variant, variant_config={"total_step": 4} if variant == "adalora" else {})
    assert LoraConfig(use_dora=True).variant == "dora" and LoraConfig(variant="dora").use_dora
    assert LoraConfig(use_dora=True, variant="dora").replace(r=4).variant == "dora"


def test_settings_are_checked_where_the_config_is_made():
    with pytest.raises(ValueError, match=r"unknown keys \['update_ratio'\] for variant 'lora'; known: \[\]"):
        LoraConfig(variant_config={"update_ratio": 2.0})
    with pytest.raises(ValueError, match="cannot use quantize='nf4'"):
        LoraConfig(variant="delta_lora", quantize="nf4")
    with pytest.raises(ValueError, match="unknown LoRA variant 'vera'"):
        LoRALinear.wrap(nn.Linear(4, 4)).add_adapter("x", 2, 4.0, variant="vera")
    with pytest.raises(ValueError, match=r"LoraConfig.variant must be one of \('lora', 'dora'"):
        LoraConfig(variant="vera")


def test_every_registered_adapter_stores_what_its_shapes_say():
    for name in variants.variant_names():
        variant = variants.get_variant(name)
        settings = {"total_step": 4} if name == "adalora" else {}
        adapter = variant.adapter(6, 5, 3, 6.0, **settings)
        assert {k: tuple(t.shape) for k, t in adapter.peft_tensors().items()} == variant.peft_shapes(3, 6, 5), name
        assert adapter.variant == name
