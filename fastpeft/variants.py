"""The LoRA variant registry: the one place that says what a variant is.

A variant (plain LoRA, DoRA, AdaLoRA, Delta-LoRA, ...) is one :func:`register_variant` call, made
beside its adapter class, with everything the rest of fastpeft needs to know about it:

- ``adapter``: the :class:`~fastpeft.adapters.LoraAdapter` subclass an adapted layer holds; its
  classmethod ``peft_shapes(r, in_features, out_features)`` gives the tensors stored per layer on
  disk, by key suffix (``{"lora_A.weight": (r, in), "lora_B.weight": (out, r)}`` for LoRA), against
  which loading checks every file;
- ``normalize(config)``: checks and fills in the variant's part of a :class:`~fastpeft.LoraConfig`
  (``variant_config`` and whatever else the variant constrains), called by ``LoraConfig.validate``
  after ``variant_config``'s keys were checked against the adapter's keyword-only settings;
- ``peft_type`` (adapter_config.json's, "LORA" unless the variant has a PEFT type of its own),
  with ``peft_fields(config)`` (the keys the variant adds to adapter_config.json) and
  ``from_peft(data) -> (LoRA fields, variant_config)`` (the inverse, for a file of that type);
- ``pack(tensors, config, prefix)`` / ``unpack(adapters, config, prefix)``: how the adapter's tensors
  change on their way to and from disk (AdaLoRA drops pruned triplets as PEFT does).

Registering a name twice, or a PEFT type another variant already reads, is a ValueError.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from fastpeft.adapters import LoraAdapter
from fastpeft.dora import DoraAdapter

LORA_PEFT_TYPE = "LORA"
_CONSTRUCTION_ARGS = {"dtype", "device"}  # keyword-only, but not settings


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    adapter: type[LoraAdapter]
    normalize: Callable[[Any], None] | None = None
    peft_type: str = LORA_PEFT_TYPE
    peft_fields: Callable[[Any], dict[str, Any]] | None = None
    from_peft: Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None
    pack: Callable[[dict[str, torch.Tensor], Any, str], dict[str, torch.Tensor]] | None = None
    unpack: Callable[[dict[str, dict[str, torch.Tensor]], Any, str], None] | None = None

    def settings(self) -> set[str] | None:
        """The ``variant_config`` keys the adapter takes (keyword-only arguments); None when it takes
        any (``**settings``) and its ``normalize`` checks them."""
        params = inspect.signature(self.adapter.__init__).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - _CONSTRUCTION_ARGS

    def check_config(self, config: Any) -> None:
        """Validate (and complete) ``config``'s variant part; ValueError names the key."""
        known = self.settings()
        if known is not None:
            unknown = sorted(set(config.variant_config) - known)
            if unknown:
                raise ValueError(
                    f"LoraConfig.variant_config has unknown keys {unknown} for variant {self.name!r}; "
                    f"known: {sorted(known)}"
                )
        if self.normalize is not None:
            self.normalize(config)

    def peft_shapes(self, r: int, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        return self.adapter.peft_shapes(r, in_features, out_features)


_REGISTRY: dict[str, Variant] = {}


def register_variant(name: str, adapter: type[LoraAdapter], **hooks: Any) -> Variant:
    """Register LoRA variant ``name`` (``LoraConfig(variant=name)``); ``hooks``: the fields of :class:`Variant`."""
    if name in _REGISTRY:
        raise ValueError(f"LoRA variant {name!r} is already registered (by {_REGISTRY[name].adapter.__qualname__})")
    if not (isinstance(adapter, type) and issubclass(adapter, LoraAdapter)):
        raise TypeError(f"variant {name!r}: adapter must be a LoraAdapter subclass, got {adapter!r}")
    owner = next((v.name for v in _REGISTRY.values() if v.adapter is adapter), None)
    if owner is not None:
        raise ValueError(f"variant {name!r}: {adapter.__qualname__} is already the adapter of variant {owner!r}")
    variant = Variant(name, adapter, **hooks)
    if variant.peft_type != LORA_PEFT_TYPE:
        if variant.from_peft is None:
            raise ValueError(f"variant {name!r} has peft_type {variant.peft_type!r} but no from_peft to read it")
        claimed = [v.name for v in _REGISTRY.values() if v.peft_type == variant.peft_type]
        if claimed:
            raise ValueError(f"variant {name!r}: peft_type {variant.peft_type!r} is already read by {claimed[0]!r}")
    adapter.variant = name  # the adapter's own name for itself (repr, checks) is the registry's
    _REGISTRY[name] = variant
    return variant


def get_variant(name: str) -> Variant:
    """The registered variant ``name``; ValueError listing the registered ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown LoRA variant {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def variant_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def variant_for_peft_type(peft_type: str) -> Variant | None:
    """The variant that reads adapter files of a PEFT type other than "LORA", or None."""
    return next((v for v in _REGISTRY.values() if v.peft_type == peft_type and v.from_peft is not None), None)


def peft_types() -> list[str]:
    return sorted({v.peft_type for v in _REGISTRY.values()})


def adapter_suffixes() -> tuple[str, ...]:
    """Every key suffix a registered variant stores on disk (``lora_A.weight``, ``lora_E``, ...)."""
    return tuple(dict.fromkeys(s for v in _REGISTRY.values() for s in v.peft_shapes(1, 1, 1)))


register_variant("lora", LoraAdapter)
register_variant("dora", DoraAdapter)
