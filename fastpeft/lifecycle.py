"""Adapter lifecycle on a whole model: activate, delete, disable, route rows, merge, unload.

Rules (kept simple on purpose):
- ``inject``/``add_adapter`` make the new adapter active and the only trainable one;
  ``set_adapter`` changes only which adapter runs, never ``requires_grad``.
- A layer without the active adapter runs its base weight only.
- One adapter at a time can be merged; a merged model cannot be disabled, routed or switched to
  another adapter until ``unmerge``.
- ``route_adapters(model, row_adapters)`` runs batch row i through adapter ``row_adapters[i]``
  (None = base model) in every adapter layer, so e.g. a policy and a verifier adapter share one
  forward; the base matmul still runs once per layer.
- Any other module with ``adapter_params()`` and a ``disabled`` switch (prompt tuning, prefix
  tuning, P-Tuning v2, mixed prompts) is an adapter too, named by its path in the model
  (``fastpeft_prompt``, ``fastpeft_prefix``): listed, disabled with the rest, saved, deleted. It is
  always active while attached, so it is the active adapter when no LoRA adapter is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal, overload

import torch
from torch import nn

from fastpeft.config import LoraConfig
from fastpeft.inject import adapter_configs, inject, split_path
from fastpeft.lora_linear import AdapterLinear, RowRouting, iter_adapter_layers
from fastpeft.modules_to_save import ModulesToSave
from fastpeft.qlora_linear import QLoRALinear

ACTIVE_ATTR = "fastpeft_active_adapter"


def modules_to_save_wrappers(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]


def prompt_adapters(model: nn.Module) -> dict[str, nn.Module]:
    """Adapter modules other than LoRA layers and modules_to_save copies (anything with
    ``adapter_params()`` and ``disabled``), by their path in ``model``."""
    return {
        n: m
        for n, m in model.named_modules()
        if n
        and hasattr(m, "adapter_params")
        and hasattr(m, "disabled")
        and not isinstance(m, (AdapterLinear, ModulesToSave))
    }


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters present in ``model`` (injected or loaded; prompt adapters by path)."""
    names = dict.fromkeys(adapter_configs(model))
    for _, layer in iter_adapter_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    names.update(dict.fromkeys(prompt_adapters(model)))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The LoRA adapter last activated on ``model``, else its prompt adapter (None if neither)."""
    return model.__dict__.get(ACTIVE_ATTR) or next(iter(prompt_adapters(model)), None)


def require_adapter(model: nn.Module, name: str) -> None:
    names = list_adapters(model)
    if name not in names:
        raise ValueError(f"no adapter named {name!r} in this model (adapters: {names})")


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """Inject another adapter (same as :func:`fastpeft.inject`)."""
    return inject(model, config, adapter_name)


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the adapter every layer (and every modules_to_save copy) runs."""
    require_adapter(model, adapter_name)
    if adapter_name in prompt_adapters(model):
        raise ValueError(
            f"{adapter_name!r} is a prompt adapter: it runs whenever it is attached (disable_adapters "
            "turns it off for a block)"
        )
    layers = list(iter_adapter_layers(model))
    merged = {layer.merged_adapter for _, layer in layers} - {None, adapter_name}
    if merged:
        raise RuntimeError(f"adapter(s) {sorted(merged)} are merged; unmerge before switching to {adapter_name!r}")
    for _, layer in layers:
        layer.set_adapter(adapter_name if adapter_name in layer.adapters else None)
    for _, wrapper in modules_to_save_wrappers(model):
        wrapper.set_adapter(adapter_name)
    model.__dict__[ACTIVE_ATTR] = adapter_name


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` everywhere; if it was active, the next remaining adapter becomes active."""
    require_adapter(model, adapter_name)
    prompts = prompt_adapters(model)
    if adapter_name in prompts:
        prompts[adapter_name].remove()
        return
    layers = list(iter_adapter_layers(model))
    if any(layer.merged_adapter == adapter_name for _, layer in layers):
        raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge before deleting it")
    for _, layer in layers:
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
    for _, wrapper in modules_to_save_wrappers(model):
        if adapter_name in wrapper.copies:
            wrapper.delete_adapter(adapter_name)
    adapter_configs(model).pop(adapter_name, None)
    if model.__dict__.get(ACTIVE_ATTR) == adapter_name:
        remaining = [n for n in list_adapters(model) if n not in prompts]
        model.__dict__[ACTIVE_ATTR] = None
        if remaining:
            set_adapter(model, remaining[0])


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model`` computes as the base model (no second copy of the weights)."""
    layers = [layer for _, layer in iter_adapter_layers(model)]
    merged = sorted({layer.merged_adapter for layer in layers} - {None})
    if merged:
        raise RuntimeError(f"adapter(s) {merged} are merged into the weights; unmerge before disabling adapters")
    switches = layers + [w for _, w in modules_to_save_wrappers(model)] + list(prompt_adapters(model).values())
    previous = [s.disabled for s in switches]
    for s in switches:
        s.disabled = True
    try:
        yield model
    finally:
        for s, was in zip(switches, previous):
            s.disabled = was


@contextlib.contextmanager
def route_adapters(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, batch row i of every forward uses adapter ``row_adapters[i]`` (None: base)."""
    routing = RowRouting(row_adapters)
    for name in dict.fromkeys(a for a in routing.row_adapters if a is not None):
        require_adapter(model, name)
    if any(w.copies for _, w in modules_to_save_wrappers(model)):
        raise ValueError("route_adapters does not support modules_to_save copies; they cannot be split by row")
    layers = [layer for _, layer in iter_adapter_layers(model)]
    merged = sorted({layer.merged_adapter for layer in layers} - {None})
    if merged:
        raise RuntimeError(f"adapter(s) {merged} are merged; unmerge before routing rows")
    previous = [layer.row_routing for layer in layers]
    for layer in layers:
        layer.row_routing = routing
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.row_routing = was


def merge(model: nn.Module, adapter_name: str | None = None) -> None:
    """Fold ``adapter_name`` (default: the active adapter) into the base weights of every layer."""
    name = adapter_name or model.__dict__.get(ACTIVE_ATTR)
    if name is None:
        raise ValueError("nothing to merge: the model has no active adapter")
    require_adapter(model, name)
    set_adapter(model, name)
    for _, layer in iter_adapter_layers(model):
        if name in layer.adapters:
            layer.merge(name)


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` in every layer (an NF4 base comes back re-quantized, not bit-exact)."""
    for _, layer in iter_adapter_layers(model):
        layer.unmerge()


@overload
def merge_and_unload(model: nn.Module, requantize: Literal[False] = False) -> nn.Module: ...
@overload
def merge_and_unload(model: nn.Module, requantize: Literal[True]) -> tuple[nn.Module, float]: ...


@torch.no_grad()
def merge_and_unload(model: nn.Module, requantize: bool = False) -> nn.Module | tuple[nn.Module, float]:
    """Merge the active adapter and put plain modules back; returns the model (changed in place).

    Every adapter layer becomes an ``nn.Linear`` (a GPT-2 ``Conv1D`` where it was one) holding
    W + ΔW in the layer's dtype; an NF4 base is dequantized first. With ``requantize=True`` NF4
    layers are quantized again instead (adapter-less :class:`QLoRALinear`) and the call returns
    ``(model, max_abs_error)``, the largest change re-quantization made to any merged weight.
    ``modules_to_save`` wrappers are replaced by the active adapter's copy. Prompt adapters stay
    attached (they have no weights to merge into).
    """
    name = model.__dict__.get(ACTIVE_ATTR)
    for path, layer in iter_adapter_layers(model):  # refuse before any layer is replaced
        unmerged = layer.merged_adapter is None and name in layer.adapters
        if unmerged and not all(torch.isfinite(p).all() for p in layer.adapter_params(name)):
            raise ValueError(f"adapter {name!r} has NaN/inf weights in {path}; refusing to merge it")
    max_error = 0.0
    for path, layer in list(iter_adapter_layers(model)):
        weight = layer.dense_weight(torch.float32).float()
        if layer.merged_adapter is None and name in layer.adapters:
            weight = layer.adapters[name].merge_into(layer, weight)
        if requantize and isinstance(layer, QLoRALinear):
            new = layer.to_nf4_module(weight)
            max_error = max(max_error, (new.dense_weight(torch.float32) - weight).abs().max().item())
        else:
            new = layer.to_dense_module(weight)
        parent, attr = split_path(model, path)
        setattr(parent, attr, new.train(layer.training))
    for path, wrapper in modules_to_save_wrappers(model):
        parent, attr = split_path(model, path)
        setattr(parent, attr, wrapper.copies[name] if name in wrapper.copies else wrapper.original)
    adapter_configs(model).clear()
    model.__dict__[ACTIVE_ATTR] = None
    return (model, max_error) if requantize else model
