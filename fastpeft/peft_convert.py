"""Hand a fastpeft-injected model to the PEFT/TRL stack: :func:`as_peft_model`.

TRL recognises a PEFT model by ``isinstance(model, peft.PeftModel)``; only then do ``DPOTrainer`` /
``GRPOTrainer`` with ``ref_model=None`` use the adapter-disabled model as the reference instead of
loading a second copy. ``as_peft_model(model)`` turns a model after :func:`fastpeft.inject` into a
real ``peft.PeftModel`` **in place and without copying a tensor**:

1. each fastpeft layer is replaced by its base layer (:meth:`AdapterLinear.get_base_layer`: the same
   dense weight Parameter, or a bitsandbytes ``Linear4bit`` over the same NF4 bytes), each
   ``modules_to_save`` wrapper by its original module;
2. ``peft.get_peft_model`` / ``add_adapter`` wrap exactly the layers each adapter had (its LoRA
   tensors created on the meta device, nothing initialised);
3. PEFT's ``lora_A`` / ``lora_B`` / ``lora_magnitude_vector`` weights and ``modules_to_save`` copies
   become fastpeft's own Parameters and modules (so an optimizer built before keeps training them);
4. :func:`fastpeft.patch_peft_model` points the LoRA layers at fastpeft's fused kernels.

From then on the PeftModel is the model: ``save_pretrained``, ``disable_adapter()``, Trainer
checkpoints and TRL all see PEFT. LoRA, rsLoRA and DoRA adapters convert (``bias`` and
``modules_to_save`` included); AdaLoRA, Delta-LoRA, merged adapters, routed rows and GPT-2
``Conv1D`` bases (whose weight fastpeft keeps transposed) are refused with a ValueError.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from fastpeft.adapter_io import write_base_fields
from fastpeft.bnb_interop import is_linear4bit
from fastpeft.inject import adapter_configs, split_path
from fastpeft.lifecycle import active_adapter, modules_to_save_wrappers
from fastpeft.lora_linear import iter_adapter_layers
from fastpeft.peft_patch import patch_peft_model

_PEFT_LORA_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "bias",
    "fan_in_fan_out",
    "task_type",
    "base_model_name_or_path",
)


def _check_convertible(model: nn.Module) -> dict:
    configs = adapter_configs(model)
    if not configs:
        raise ValueError(f"as_peft_model: {type(model).__name__} has no fastpeft adapters (call fastpeft.inject first)")
    bad = {n: c.variant for n, c in configs.items() if c.variant not in ("lora", "dora")}
    if bad:
        raise ValueError(f"as_peft_model converts LoRA, rsLoRA and DoRA adapters; {bad} have no PEFT LoRA equivalent")
    for path, layer in iter_adapter_layers(model):
        if layer.merged_adapter is not None:
            raise ValueError(f"as_peft_model: adapter {layer.merged_adapter!r} is merged in {path}; unmerge() first")
        if layer.row_routing is not None:
            raise ValueError("as_peft_model: rows are routed to adapters (route_adapters); clear the routing first")
        if layer.fan_in_fan_out:
            raise ValueError(f"as_peft_model: {path} is a GPT-2 Conv1D, whose weight fastpeft stores transposed")
    return configs


@contextlib.contextmanager
def _loaded_in_4bit(model: nn.Module, on: bool) -> Iterator[None]:
    """PEFT wraps a ``Linear4bit`` in its 4-bit LoRA layer only when the model says it is loaded in 4 bit."""
    if not on or getattr(model, "is_loaded_in_4bit", False):
        yield
        return
    model.__dict__["is_loaded_in_4bit"] = True
    try:
        yield
    finally:
        model.__dict__.pop("is_loaded_in_4bit", None)


def _peft_config(config, targets: list[str], modules_to_save: list[str]):
    import peft

    fields = {f: getattr(config, f) for f in _PEFT_LORA_FIELDS}
    return peft.LoraConfig(**fields, target_modules=targets, modules_to_save=modules_to_save or None)


def as_peft_model(model: nn.Module, *, patch: bool = True):
    """Convert a model after :func:`fastpeft.inject` into a ``peft.PeftModel`` sharing its tensors.

    Every adapter converts under its name; the active one stays active and ``requires_grad``
    flags are kept. ``patch`` (default) runs the LoRA layers on fastpeft's kernels
    (:func:`fastpeft.patch_peft_model`). ``model`` itself becomes the PeftModel's base model; keep
    using the returned PeftModel. Returns ``peft.PeftModel``.
    """
    import peft

    configs = _check_convertible(model)
    layers = dict(iter_adapter_layers(model))
    wrappers = dict(modules_to_save_wrappers(model))
    active = active_adapter(model) or next(iter(configs))
    # fastpeft's tensors, to hand to PEFT's modules once they exist
    adapters = {(path, name): a for path, layer in layers.items() for name, a in layer.adapters.items()}
    copies = {(path, name): c for path, w in wrappers.items() for name, c in w.copies.items()}
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    has_4bit = False
    for path, layer in layers.items():
        parent, name = split_path(model, path)
        base = layer.get_base_layer()
        base.train(layer.training)
        has_4bit = has_4bit or is_linear4bit(base)
        setattr(parent, name, base)
    for path, wrapper in wrappers.items():
        parent, name = split_path(model, path)
        setattr(parent, name, wrapper.original)
    for attr in ("fastpeft_adapter_configs", "fastpeft_active_adapter", "save_pretrained"):
        model.__dict__.pop(attr, None)  # the PeftModel owns configs, activation and saving now

    peft_model = None
    with _loaded_in_4bit(model, has_4bit):
        for adapter_name, config in configs.items():
            targets = sorted(path for (path, name) in adapters if name == adapter_name)
            saved = sorted(path for (path, name) in copies if name == adapter_name)
            peft_config = _peft_config(config, targets, saved)
            if peft_model is None:
                peft_model = peft.get_peft_model(model, peft_config, adapter_name, low_cpu_mem_usage=True)
            else:
                peft_model.add_adapter(adapter_name, peft_config, low_cpu_mem_usage=True)
    peft_model.set_adapter(active)
    inner = peft_model.base_model.model
    for (path, name), adapter in adapters.items():
        lora = inner.get_submodule(path)
        lora.lora_A[name].weight = adapter.lora_A
        lora.lora_B[name].weight = adapter.lora_B
        if adapter.variant == "dora":
            lora.lora_magnitude_vector[name].weight = adapter.magnitude
    for (path, name), copy in copies.items():
        inner.get_submodule(path).modules_to_save[name] = copy
    for param in peft_model.parameters():  # PEFT's set_adapter toggled flags; fastpeft's decide
        if id(param) in requires_grad:
            param.requires_grad_(requires_grad[id(param)])
    nf4_configs = {n: c for n, c in configs.items() if c.quantize is not None}
    if nf4_configs:  # PEFT's files cannot say the base was quantized by fastpeft: add fastpeft_config.json
        peft_model.save_pretrained = types.MethodType(_saving_nf4_settings(nf4_configs), peft_model)
    return patch_peft_model(peft_model) if patch else peft_model


def _saving_nf4_settings(configs: dict):
    def save_pretrained(self, save_directory, *args, **kwargs):
        type(self).save_pretrained(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for name, config in configs.items():
                write_base_fields(config, Path(save_directory) if name == "default" else Path(save_directory) / name)

    return save_pretrained
