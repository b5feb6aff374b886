"""LoraConfig: which layers get which adapter, with PEFT's field names where they overlap.

PEFT fields kept with PEFT's meaning: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``
(list of names matched exactly or as a dotted suffix, a regex string matched against the full
module path, or ``"all-linear"`` = every nn.Linear / GPT-2 Conv1D except the LM head),
``exclude_modules``, ``layers_to_transform``, ``layers_pattern``, ``use_rslora`` (scaling
alpha/sqrt(r) instead of alpha/r), ``use_dora``, ``bias`` ("none" | "all" | "lora_only"),
``modules_to_save``, ``init_lora_weights`` (True = kaiming A / zero B, "gaussian", False = random
B too), ``fan_in_fan_out`` (informational: GPT-2 Conv1D layers are detected by type).

Ours: ``quantize`` (None | "nf4": every frozen linear in the transformer blocks becomes NF4),
``double_quant``, ``blocksize``, ``compute_dtype``, ``last_layers_fraction`` (adapters only in the
last fraction of transformer blocks, at least one block), ``variant`` (a registered variant:
"lora" | "dora" | "adalora" | "delta_lora", see :mod:`fastpeft.variants`) with its parameters in
``variant_config``. ``use_dora=True`` is PEFT's spelling of ``variant="dora"``; with another variant
it is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from fastpeft.variants import LORA_PEFT_TYPE, get_variant, peft_types, variant_for_peft_type, variant_names

BIAS_OPTIONS = ("none", "all", "lora_only")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# What PEFT 0.21 writes in adapter_config.json besides our fields (all defaults), so PEFT reads our
# file without warnings. Keys PEFT knows but we cannot honour are refused on load (see from_peft_dict).
_PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "qalora_group_size": 16,
    "rank_pattern": {},
    "revision": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
# PEFT options that change the maths of a LoRA adapter; loading a file that sets one is refused.
_UNSUPPORTED_PEFT_OPTIONS = (
    "alpha_pattern",
    "rank_pattern",
    "layer_replication",
    "lora_bias",
    "use_qalora",
    "arrow_config",
    "alora_invocation_tokens",
    "use_bdlora",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "target_parameters",
    "trainable_token_indices",
)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


@dataclasses.dataclass
class LoraConfig:
    """Adapter configuration; every field is validated on construction (ValueError names it)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"
    # ours
    quantize: str | None = None
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype | str | None = None
    last_layers_fraction: float | None = None
    variant: str = "lora"
    variant_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_bools()  # before use_dora is read: the string "no" is truthy
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = sorted(set(self.exclude_modules))
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.compute_dtype, str):
            if self.compute_dtype not in _DTYPES:
                raise ValueError(
                    f"LoraConfig.compute_dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {self.compute_dtype!r}"
                )
            self.compute_dtype = _DTYPES[self.compute_dtype]
        if self.use_dora and self.variant not in ("lora", "dora"):
            raise ValueError(
                f"LoraConfig.use_dora=True selects the DoRA variant and cannot be combined with "
                f"variant={self.variant!r}"
            )
        if self.use_dora:
            self.variant = "dora"
        self.use_dora = self.variant == "dora"
        self.validate()

    def _check_bools(self) -> None:
        for field in ("use_rslora", "use_dora", "fan_in_fan_out", "double_quant"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"LoraConfig.{field} must be True or False, got {getattr(self, field)!r}")

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field and its value."""

        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"LoraConfig.{field} must be {expected}, got {getattr(self, field)!r}")

        self._check_bools()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise bad("r", "a positive int")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0)
        ):
            raise bad("lora_alpha", "a positive number")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "a float in [0, 1)")
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, str) and not (_is_str_list(value) and value):
                raise bad(field, "None, a regex string or a non-empty list of module names")
        if self.layers_to_transform is not None and not (
            isinstance(self.layers_to_transform, list)
            and self.layers_to_transform
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform)
        ):
            raise bad("layers_to_transform", "None, a non-negative int or a non-empty list of them")
        pattern = self.layers_pattern
        if pattern is not None and not (isinstance(pattern, str) or _is_str_list(pattern)):
            raise bad("layers_pattern", "None, a string or a list of strings")
        if self.bias not in BIAS_OPTIONS:
            raise bad("bias", f"one of {BIAS_OPTIONS}")
        if self.modules_to_save is not None and not _is_str_list(self.modules_to_save):
            raise bad("modules_to_save", "None or a list of module names")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise bad("init_lora_weights", "True, False or 'gaussian'")
        if self.quantize not in (None, "nf4"):
            raise bad("quantize", "None or 'nf4'")
        if self.blocksize not in tuple(2**i for i in range(5, 13)):
            raise bad("blocksize", "a power of two from 32 to 4096")
        if self.compute_dtype is not None and self.compute_dtype not in _DTYPES.values():
            raise bad("compute_dtype", "None, torch.float32, torch.float16 or torch.bfloat16")
        if self.last_layers_fraction is not None:
            if not isinstance(self.last_layers_fraction, (int, float)) or not 0 < self.last_layers_fraction <= 1:
                raise bad("last_layers_fraction", "None or a number in (0, 1]")
            if self.layers_to_transform is not None:
                raise ValueError("LoraConfig.last_layers_fraction and layers_to_transform cannot both be set")
        if self.variant not in variant_names():
            raise bad("variant", f"one of {variant_names()}")
        if not isinstance(self.variant_config, dict):
            raise bad("variant_config", "a dict")
        get_variant(self.variant).check_config(self)  # may fill in variant_config (AdaLoRA: init_r sets r)
        if self.task_type != "CAUSAL_LM":
            raise bad("task_type", "'CAUSAL_LM'")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    # -- PEFT's adapter_config.json -------------------------------------------------------------

    def to_peft_dict(self) -> dict[str, Any]:
        """The dict PEFT's ``LoraConfig.save_pretrained`` writes (same keys, PEFT-compatible values)."""
        target = self.target_modules
        variant = get_variant(self.variant)
        out = dict(_PEFT_DEFAULTS)
        out.update(
            peft_type=variant.peft_type,
            task_type=self.task_type,
            base_model_name_or_path=self.base_model_name_or_path,
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(target) if isinstance(target, (list, tuple)) else target,
            exclude_modules=self.exclude_modules,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            bias=self.bias,
            modules_to_save=self.modules_to_save,
            init_lora_weights=self.init_lora_weights,
            fan_in_fan_out=self.fan_in_fan_out,
            inference_mode=True,
        )
        if variant.peft_fields is not None:
            out.update(variant.peft_fields(self))
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], **overrides: Any) -> LoraConfig:
        """Build from a parsed adapter_config.json; refuses PEFT types and options we cannot honour."""
        if not isinstance(data, dict):
            raise ValueError(f"adapter_config.json must hold a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        variant = variant_for_peft_type(peft_type) if peft_type != LORA_PEFT_TYPE else None
        if variant is not None:  # e.g. ADALORA: its own keys -> variant_config, the rest read as LORA's
            data, variant_config = variant.from_peft(data)
            overrides = {"variant": variant.name, "variant_config": variant_config, **overrides}
        elif peft_type != LORA_PEFT_TYPE:
            raise ValueError(
                f"adapter_config.json has peft_type {peft_type!r}; available in this build: {peft_types()}"
            )
        for key in _UNSUPPORTED_PEFT_OPTIONS:
            value = data.get(key)
            if value not in (None, False, {}, [], _PEFT_DEFAULTS.get(key)):
                raise ValueError(f"adapter_config.json sets {key}={value!r}, which fastpeft does not support")
        init = data.get("init_lora_weights", True)
        fields = {
            "r": data.get("r", 8),
            "lora_alpha": data.get("lora_alpha", 8),
            "lora_dropout": data.get("lora_dropout", 0.0),
            "target_modules": data.get("target_modules"),
            "exclude_modules": data.get("exclude_modules"),
            "layers_to_transform": data.get("layers_to_transform"),
            "layers_pattern": data.get("layers_pattern"),
            "use_rslora": bool(data.get("use_rslora", False)),
            "use_dora": bool(data.get("use_dora", False)),
            "bias": data.get("bias", "none"),
            "modules_to_save": data.get("modules_to_save"),
            # initialisation does not matter for loaded weights; keep it when it is one we know
            "init_lora_weights": init if init in (True, False, "gaussian") else True,
            "fan_in_fan_out": bool(data.get("fan_in_fan_out", False)),
            "base_model_name_or_path": data.get("base_model_name_or_path"),
            "task_type": data.get("task_type") or "CAUSAL_LM",
        }
        fields.update(overrides)
        return cls(**fields)
