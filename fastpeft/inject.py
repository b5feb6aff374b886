"""Model surgery: swap adapter layers into a transformers model in place, freeze the rest, report.

``inject(model, config, adapter_name)`` walks ``model.named_modules()`` and replaces each targeted
``nn.Linear`` / GPT-2 ``Conv1D`` / bitsandbytes ``Linear4bit`` with a :class:`LoRALinear` or
:class:`QLoRALinear` via ``setattr`` on its parent (transformers classes are never patched). A
module that already is an adapter layer gets one more adapter. Every decision is made before the
first module is touched, so a bad config leaves the model unchanged.

Matching follows PEFT: a list of names matches a module path exactly or as a dotted suffix, a
string is a regex matched against the full path, ``"all-linear"`` takes every linear except the
LM head. ``layers_to_transform`` / ``last_layers_fraction`` keep only modules whose block index
(the number after ``layers_pattern``, default: the first ``.<name>.<int>.`` in the path) is chosen.

With ``quantize="nf4"`` every dense linear except the LM head and ``modules_to_save`` becomes NF4,
one layer at a time (the dense weight is dropped as soon as its layer is replaced); targets get
adapters, the rest become adapter-less NF4 layers.
"""

from __future__ import annotations

import dataclasses
import math
import re

from torch import nn

from fastpeft.config import LoraConfig
from fastpeft.hf_checkpoint import install_save_pretrained
from fastpeft.lora_linear import AdapterLinear, LoRALinear, iter_adapter_layers, linear_kind
from fastpeft.modules_to_save import ModulesToSave
from fastpeft.qlora_linear import QLoRALinear

CONFIGS_ATTR = "fastpeft_adapter_configs"  # {adapter name: LoraConfig} on the model instance
# PEFT's defaults when target_modules is None
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters injected into ``model``, by name (empty if none)."""
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def split_path(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the module at dotted ``path``."""
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def _is_wrapped(path: str, wrapper_paths: list[str]) -> bool:
    return any(path.startswith(w + ".") for w in wrapper_paths)


def linear_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like module (dense, Conv1D, Linear4bit, adapter layer) by path, outside wrappers."""
    wrappers = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    found = {}
    for path, module in model.named_modules():
        if path and not _is_wrapped(path, wrappers) and (isinstance(module, AdapterLinear) or linear_kind(module)):
            found[path] = module
    return found


def _matches(path: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The transformer-block index in ``path`` (PEFT's rule), or None."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    regexes = [rf".*\.{re.escape(p)}\.(\d+)\." for p in patterns] if patterns else [r".*\.[^.]*\.(\d+)\."]
    for regex in regexes:
        match = re.match(regex, path)
        if match:
            return int(match.group(1))
    return None


def _lm_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` targets; ValueError listing the linear names when none match."""
    candidates = linear_paths(model)
    lm_head = _lm_head(model)
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"LoraConfig.target_modules is None and there is no default for model type {model_type!r}")
        spec = DEFAULT_TARGETS[model_type]
    if spec == "all-linear":
        paths = [p for p, m in candidates.items() if m is not lm_head]
    else:
        paths = [p for p in candidates if _matches(p, spec)]
    if config.exclude_modules is not None:
        paths = [p for p in paths if not _matches(p, config.exclude_modules)]
    if not paths:
        names = sorted({p.rpartition(".")[2] for p in candidates})
        raise ValueError(f"target_modules {spec!r} matched no module; linear modules in this model: {names}")
    layers = config.layers_to_transform
    if config.last_layers_fraction is not None:
        indices = [i for i in (layer_index(p, config.layers_pattern) for p in candidates) if i is not None]
        if not indices:
            raise ValueError("last_layers_fraction is set but no module path holds a block index")
        n_blocks = max(indices) + 1
        keep = max(1, math.floor(config.last_layers_fraction * n_blocks + 1e-9))
        layers = list(range(n_blocks - keep, n_blocks))
    if layers is not None:
        paths = [p for p in paths if layer_index(p, config.layers_pattern) in layers]
        if not paths:
            raise ValueError(f"target_modules {spec!r} matched modules, but none in blocks {layers}")
    return paths


def _modules_to_save_paths(model: nn.Module, names: list[str] | None) -> list[str]:
    if not names:
        return []
    paths = [p for p, m in model.named_modules() if p and (isinstance(m, ModulesToSave) or _matches(p, names))]
    wrapped = [p for p in paths if isinstance(model.get_submodule(p), ModulesToSave)]
    paths = [p for p in paths if not _is_wrapped(p, wrapped) and not _is_wrapped(p, paths)]
    missing = [n for n in names if not any(_matches(p, [n]) for p in paths)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module in this model")
    return paths


def _new_layer(module: nn.Module, quantize: bool, config: LoraConfig) -> AdapterLinear:
    """The adapter layer replacing ``module`` (no adapter added yet)."""
    if isinstance(module, AdapterLinear):
        return module
    if linear_kind(module) == "linear4bit":
        return QLoRALinear.wrap_bnb(module, config.compute_dtype)
    if quantize:
        return QLoRALinear.quantize_linear(module, config.blocksize, config.double_quant, config.compute_dtype)
    return LoRALinear.wrap(module)


def inject(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", *, target_paths: list[str] | None = None
) -> nn.Module:
    """Add adapter ``adapter_name`` to the modules ``config`` targets (in place); returns ``model``.

    The new adapter becomes the active one and the only trainable one (plus its ``modules_to_save``
    copies and, per ``config.bias``, biases); everything else is frozen. ``target_paths`` overrides
    the matching with exact module paths (used when loading a saved adapter).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject expects a torch nn.Module (e.g. a transformers model), got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"inject expects a fastpeft.LoraConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists in this model (adapters: {list(configs)})")
    targets = list(target_paths) if target_paths is not None else find_targets(model, config)
    if any(isinstance(m, AdapterLinear) and m.merged_adapter for _, m in iter_adapter_layers(model)):
        raise RuntimeError("an adapter is merged into this model; unmerge before adding another adapter")
    save_paths = _modules_to_save_paths(model, config.modules_to_save)
    lm_head = _lm_head(model)
    quantize_paths: list[str] = []
    if config.quantize == "nf4":
        quantize_paths = [
            p
            for p, m in linear_paths(model).items()
            if linear_kind(m) in ("linear", "conv1d") and m is not lm_head and p not in save_paths
        ]
    if set(targets) & set(save_paths):
        raise ValueError(f"modules {sorted(set(targets) & set(save_paths))} are both targets and modules_to_save")

    # all checks done: modify the model
    for path in dict.fromkeys(quantize_paths + targets):
        parent, name = split_path(model, path)
        old = getattr(parent, name)
        layer = _new_layer(old, path in quantize_paths, config)
        if path in targets:
            layer.add_adapter(
                adapter_name,
                config.r,
                config.lora_alpha,
                config.lora_dropout,
                config.use_rslora,
                variant=config.variant,
                init_lora_weights=config.init_lora_weights,
                variant_config=config.variant_config,
            )
        if layer is not old:
            layer.train(old.training)  # a new module defaults to training mode; keep the model's mode
            setattr(parent, name, layer)
        del old, layer  # drop the dense weight of a quantized layer before the next one
    for path in save_paths:
        parent, name = split_path(model, path)
        wrapper = getattr(parent, name)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper).train(wrapper.training)
            setattr(parent, name, wrapper)
        wrapper.add_adapter(adapter_name)
    configs[adapter_name] = config
    from fastpeft.lifecycle import set_adapter  # lifecycle builds on this module

    set_adapter(model, adapter_name)
    mark_trainable(model, adapter_name)
    install_save_pretrained(model)  # save_pretrained / Trainer checkpoints write PEFT-format adapters
    return model


def mark_trainable(model: nn.Module, adapter_name: str) -> None:
    """Freeze everything, then unfreeze adapter ``adapter_name``, its module copies and biases per config."""
    config = adapter_configs(model)[adapter_name]
    model.requires_grad_(False)
    for _, layer in iter_adapter_layers(model):
        if adapter_name in layer.adapters:
            layer.adapters[adapter_name].requires_grad_(True)
            if config.bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.copies:
            module.copies[adapter_name].requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad_(True)


@dataclasses.dataclass
class ParameterReport:
    """Trainable and total parameter counts (an NF4 weight counts its dense element count)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable vs all parameters of ``model`` (like PEFT's ``print_trainable_parameters``)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            total += module.in_features * module.out_features
        elif linear_kind(module) == "linear4bit":
            total += module.weight.numel()  # Params4bit packs two values per element
    return ParameterReport(trainable, total)
