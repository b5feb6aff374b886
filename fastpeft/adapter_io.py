"""Save and load adapters in PEFT's on-disk format, exactly.

A directory holds ``adapter_config.json`` (the keys PEFT 0.21 writes: peft_type "LORA", task_type
"CAUSAL_LM", r, lora_alpha, target_modules, use_rslora, use_dora, fan_in_fan_out, ...) and
``adapter_model.safetensors`` with keys (adapter name stripped, as PEFT does):

    base_model.model.<module path>.lora_A.weight        [r, in]
    base_model.model.<module path>.lora_B.weight        [out, r]
    base_model.model.<module path>.lora_magnitude_vector [out]      (DoRA)
    base_model.model.<module path>.lora_A / lora_E / lora_B         (AdaLoRA: [r, in], [r, 1], [out, r])
    base_model.model.<module path>.base_layer.bias      (bias="all"/"lora_only", adapted layers)
    base_model.model.<path>.bias / .<param>             (bias="all" elsewhere; modules_to_save)

Which tensors a variant stores, with which shapes, is the variant's (:mod:`fastpeft.variants`).
Loading validates every key, shape and dtype against the model before anything is assigned, so a
truncated file, a foreign architecture or a wrong shape raises and leaves the model unchanged.
Pickle files (``adapter_model.bin``) are refused unless ``allow_pickle=True``, and then read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastpeft.config import LoraConfig
from fastpeft.inject import adapter_configs, inject, linear_paths, mark_trainable
from fastpeft.lifecycle import (
    ACTIVE_ATTR,
    active_adapter,
    list_adapters,
    modules_to_save_wrappers,
    prompt_adapters,
    require_adapter,
    set_adapter,
)
from fastpeft.lora_linear import AdapterLinear, iter_adapter_layers, linear_kind
from fastpeft.variants import adapter_suffixes, get_variant

CONFIG_NAME = "adapter_config.json"
# what PEFT's config cannot say about an NF4 base fastpeft quantized itself; load_adapter applies it
FASTPEFT_CONFIG_NAME = "fastpeft_config.json"
_BASE_FIELDS = ("quantize", "double_quant", "blocksize", "compute_dtype")
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

PROMPT_PEFT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "FASTPEFT_GATED_PREFIX")


def _base_model_name(model: nn.Module) -> str | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) to ``directory`` in PEFT's format."""
    name = adapter_name or active_adapter(model)
    if name is None:
        raise ValueError("save_adapter: the model has no active adapter; pass adapter_name")
    require_adapter(model, name)
    prompt = prompt_adapters(model).get(name)
    if prompt is not None:  # prompt / prefix tuning: PEFT's format where PEFT has the method
        from fastpeft.prompt_io import save_prompt_adapter

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"save_adapter: {directory} exists and is not a directory")
        save_prompt_adapter(prompt, directory, _base_model_name(model))
        return directory
    config = adapter_configs(model)[name]
    layers = [(path, layer) for path, layer in iter_adapter_layers(model) if name in layer.adapters]
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers:
        for suffix, tensor in layer.adapters[name].peft_tensors().items():
            tensors[f"{PREFIX}{path}.{suffix}"] = tensor
        if config.bias == "lora_only" and layer.bias is not None:
            tensors[f"{PREFIX}{path}.base_layer.bias"] = layer.bias
    if config.bias == "all":
        adapter_paths = {path for path, _ in iter_adapter_layers(model)}
        wrapper_paths = [path for path, _ in modules_to_save_wrappers(model)]
        for pname, param in model.named_parameters():
            module_path, _, leaf = pname.rpartition(".")
            if "bias" not in pname or any(pname.startswith(w + ".") for w in wrapper_paths) or ".adapters." in pname:
                continue
            key = f"{module_path}.base_layer.{leaf}" if module_path in adapter_paths else pname
            tensors[PREFIX + key] = param
    for path, wrapper in modules_to_save_wrappers(model):
        if name in wrapper.copies:
            for pname, tensor in wrapper.copies[name].state_dict().items():
                tensors[f"{PREFIX}{path}.{pname}"] = tensor
    variant = get_variant(config.variant)
    if variant.pack is not None:  # e.g. AdaLoRA: PEFT drops pruned triplets (rank_pattern) on save
        tensors = variant.pack(tensors, config, PREFIX)
    target = config.target_modules
    if target is None or target == "all-linear":  # PEFT stores the resolved names
        target = sorted({path.rpartition(".")[2] for path, _ in layers})
    peft_config = config.replace(
        target_modules=target,
        fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in layers),
        base_model_name_or_path=config.base_model_name_or_path or _base_model_name(model),
    ).to_peft_dict()
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_adapter: {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied weights)
    save_file(
        {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
        str(directory / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    (directory / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    write_base_fields(config, directory)
    return directory


def write_base_fields(config: LoraConfig, directory: Path) -> None:
    """``fastpeft_config.json``: the NF4 settings of a base fastpeft quantized (nothing otherwise)."""
    if config.quantize is None:
        return
    base = {f: getattr(config, f) for f in _BASE_FIELDS}
    base["compute_dtype"] = None if config.compute_dtype is None else str(config.compute_dtype).removeprefix("torch.")
    (directory / FASTPEFT_CONFIG_NAME).write_text(json.dumps(base, indent=2, sort_keys=True) + "\n")


def _read_base_fields(directory: Path) -> dict:
    """The NF4 settings :func:`save_adapter` recorded (empty when the base was not quantized by us)."""
    path = directory / FASTPEFT_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or set(data) - set(_BASE_FIELDS):
        raise ValueError(f"{path} must hold an object with keys from {_BASE_FIELDS}, got {data!r}")
    return data


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {directory} an adapter directory?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


def _read_tensors(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    weights, pickled = directory / WEIGHTS_NAME, directory / PICKLE_NAME
    if weights.is_file():
        try:
            return load_file(str(weights), device="cpu")
        except Exception as err:  # safetensors raises its own error types for bad headers/sizes
            raise ValueError(f"{weights} is truncated or corrupted: {err}") from err
    if pickled.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{pickled} is a pickle file and is refused; convert it to safetensors or pass "
                "allow_pickle=True (it is then read with torch.load(weights_only=True))"
            )
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{pickled} is truncated, corrupted or holds more than tensors: {err}") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{pickled} must hold a dict of tensors")
        return state
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {PICKLE_NAME}) in {directory}")


@dataclasses.dataclass
class _LoadPlan:
    adapters: dict[str, dict[str, torch.Tensor]]  # module path -> {suffix: tensor}
    params: dict[str, torch.Tensor]  # our parameter path (biases) -> tensor
    copies: dict[str, dict[str, torch.Tensor]]  # modules_to_save path -> {state key: tensor}


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    kind = linear_kind(module)
    if isinstance(module, AdapterLinear) or kind == "linear4bit":
        return module.in_features, module.out_features
    weight = module.weight
    return (weight.shape[0], weight.shape[1]) if kind == "conv1d" else (weight.shape[1], weight.shape[0])


def _check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"key {key}: shape {tuple(tensor.shape)} in the file does not fit the model's {tuple(expected)}"
        )
    if not tensor.is_floating_point():
        raise ValueError(f"key {key}: dtype {tensor.dtype} is not floating point")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"key {key}: the adapter file holds NaN/inf values (a diverged run?); refusing to load it")


def _plan(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> _LoadPlan:
    """Check every tensor against the model; nothing is modified here."""
    plan = _LoadPlan({}, {}, {})
    variant = get_variant(config.variant)
    suffixes = adapter_suffixes()
    linears = linear_paths(model)
    mts_names = config.modules_to_save or []
    modules = dict(model.named_modules())
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"key {key}: PEFT keys start with {PREFIX!r}")
        path = key[len(PREFIX) :]
        suffix = next((s for s in suffixes if path.endswith("." + s)), None)
        if suffix is not None:
            plan.adapters.setdefault(path[: -len(suffix) - 1], {})[suffix] = tensor
            continue
        owner = next(
            (
                m
                for m in modules
                if m and path.startswith(m + ".") and any(m == n or m.endswith("." + n) for n in mts_names)
            ),
            None,
        )
        if owner is not None:
            plan.copies.setdefault(owner, {})[path[len(owner) + 1 :]] = tensor
        elif path.endswith(".base_layer.bias") and config.bias != "none":
            plan.params[path.replace(".base_layer.bias", ".bias")] = tensor
        elif path.endswith("bias") and config.bias == "all":
            plan.params[path] = tensor
        else:
            raise ValueError(f"key {key}: not a LoRA tensor, bias or modules_to_save tensor this config expects")
    if not plan.adapters:
        raise ValueError("the adapter file holds no LoRA tensors (lora_A.weight / lora_B.weight)")
    if variant.unpack is not None:  # e.g. AdaLoRA: pruned triplets restored as zeros at init_r
        variant.unpack(plan.adapters, config, PREFIX)
    for path, found in plan.adapters.items():
        key = PREFIX + path
        if path not in linears:
            what = "does not exist" if path not in modules else f"is a {type(modules[path]).__name__}, not a linear"
            raise ValueError(
                f"key {key}.*: module {path!r} {what} in this model (adapter made for another architecture?)"
            )
        shapes = variant.peft_shapes(config.r, *_features(linears[path]))
        missing, extra = set(shapes) - set(found), set(found) - set(shapes)
        if missing or extra:
            raise ValueError(f"module {path}: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}")
        for suffix, tensor in found.items():
            _check_shape(f"{key}.{suffix}", tensor, shapes[suffix])
    for path, tensor in plan.params.items():
        try:
            param = model.get_parameter(path)
        except AttributeError as err:
            raise ValueError(f"key {PREFIX}{path}: no such parameter in this model") from err
        _check_shape(PREFIX + path, tensor, tuple(param.shape))
    for path, state in plan.copies.items():
        module = modules[path]
        reference = (module.original if hasattr(module, "copies") else module).state_dict()
        for name, tensor in state.items():
            if name not in reference:
                raise ValueError(f"key {PREFIX}{path}.{name}: module {path} has no such tensor")
            _check_shape(f"{PREFIX}{path}.{name}", tensor, tuple(reference[name].shape))
    return plan


@torch.no_grad()
def load_adapter(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    allow_pickle: bool = False,
    activate: bool = True,
    **config_overrides: object,
) -> nn.Module:
    """Load a PEFT-format LoRA/rsLoRA/DoRA/AdaLoRA adapter from ``directory`` into ``model`` as ``adapter_name``.

    Prompt-learning directories (PROMPT_TUNING, PREFIX_TUNING, FASTPEFT_GATED_PREFIX) are handed to
    :func:`fastpeft.prompt_io.load_prompt_adapter` (``adapter_name`` does not apply to them).

    Works on a plain model (adapter layers are injected) and on one that already has adapters.
    ``is_trainable=False`` (PEFT's default) loads the adapter frozen; on a model that already has
    adapters every other ``requires_grad`` stays as it was, a plain model gets a frozen base.
    ``is_trainable=True`` makes it the trainable adapter (as ``inject`` does). With
    ``activate`` the adapter becomes the active one. ``config_overrides`` sets our own config fields
    (``quantize="nf4"``, ``double_quant``, ``compute_dtype``); by default they are those the directory's
    ``fastpeft_config.json`` recorded (an adapter trained on a base fastpeft quantized to NF4 is
    reloaded on the same NF4 weights). Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter expects a torch nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    raw_config = _read_config(directory)
    if raw_config.get("peft_type") in PROMPT_PEFT_TYPES:
        # prompt-learning adapters (prompt/prefix tuning, our gated prefixes) attach differently
        from fastpeft.prompt_io import load_prompt_adapter

        load_prompt_adapter(model, directory, allow_pickle=allow_pickle)
        return model
    config = LoraConfig.from_peft_dict(raw_config, **{**_read_base_fields(directory), **config_overrides})
    if adapter_name in adapter_configs(model):
        existing = list(adapter_configs(model))
        raise ValueError(f"adapter {adapter_name!r} already exists in this model (adapters: {existing})")
    plan = _plan(model, config, _read_tensors(directory, allow_pickle))

    previous_active = model.__dict__.get(ACTIVE_ATTR)  # a LoRA adapter (prompt adapters are always on)
    # a model that already has adapters keeps its requires_grad flags; a plain one gets a frozen base
    had_adapters = bool(list_adapters(model))
    trainable = {id(p): p.requires_grad and had_adapters for p in model.parameters()}
    inject(model, config, adapter_name, target_paths=list(plan.adapters))
    for path, found in plan.adapters.items():
        model.get_submodule(path).adapters[adapter_name].load_peft_tensors(found)
    for path, tensor in plan.params.items():
        param = model.get_parameter(path)
        param.copy_(tensor.to(device=param.device, dtype=param.dtype))
    for path, state in plan.copies.items():
        copy = model.get_submodule(path).copies[adapter_name]
        for name, target in copy.state_dict(keep_vars=True).items():
            if name in state:
                target.copy_(state[name].to(device=target.device, dtype=target.dtype))
    if is_trainable:
        mark_trainable(model, adapter_name)
    else:
        for param in model.parameters():
            param.requires_grad_(trainable.get(id(param), False))
    if not activate and previous_active is not None:
        set_adapter(model, previous_active)
    return model
