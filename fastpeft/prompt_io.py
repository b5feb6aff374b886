"""Save and load prompt-learning adapters.

PEFT's format (peft 0.21) for what PEFT has, so either library reads the other's files:
``adapter_config.json`` + ``adapter_model.safetensors`` holding one tensor ``prompt_embeddings``:
- prompt tuning: ``[P, hidden]``; config ``peft_type: "PROMPT_TUNING"``, ``token_dim: hidden``;
- prefix tuning: ``[P, num_layers·2·H_kv·D]`` (the reparameterisation MLP, if any, evaluated as
  PEFT does on save); config ``peft_type: "PREFIX_TUNING"``, ``token_dim: H_kv·D``,
  ``num_attention_heads: H_kv`` (PEFT's GQA convention).

Our own format for gated or layer-subset prefixes (P-Tuning v2, dynamic mixed prompts), which PEFT
cannot express: config ``peft_type: "FASTPEFT_GATED_PREFIX"``, ``format_version: 1``,
``num_virtual_tokens``, ``num_layers``, ``num_key_value_heads``, ``head_dim``, ``layers`` (adapted
layer indices), ``gate`` (null, or ``{"kind": "sigmoid", "prune_below"}`` /
``{"kind": "hard_concrete", "beta", "gamma", "zeta"}``), ``folded`` (bool); tensors
``prefix_kv [P, len(layers), 2, H_kv, D]`` plus ``gate_logits`` or ``gate_log_alpha``
``[len(layers)]`` (unfolded gate) or ``prefix_logit_bias [len(layers)]`` (folded). A reparameterisation
MLP is saved evaluated, so a loaded adapter has a plain table.

Weights are read from safetensors only; a pickled ``adapter_model.bin`` is refused unless the
caller passes ``allow_pickle=True`` (then read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastpeft.mixed_prompts import HardConcreteGate, SigmoidGate
from fastpeft.prefix_attention_hf import model_geometry
from fastpeft.prefix_tuning import PrefixAdapter, attach_prefix_adapter
from fastpeft.prompt_tuning import PromptTuningAdapter, attach_prompt_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
GATED_PREFIX_TYPE = "FASTPEFT_GATED_PREFIX"
_GATE_TENSOR = {"sigmoid": "gate_logits", "hard_concrete": "gate_log_alpha"}


def _peft_common(num_layers: int, num_virtual_tokens: int, base_model_name_or_path: str | None) -> dict:
    return {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": num_virtual_tokens,
        "num_transformer_submodules": 1,
        "num_layers": num_layers,
        "modules_to_save": None,
        "auto_mapping": None,
    }


def save_prompt_adapter(
    adapter: PromptTuningAdapter | PrefixAdapter,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write ``adapter`` to ``directory`` (PEFT's format where PEFT has the method, ours otherwise)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(adapter, PromptTuningAdapter):
        if adapter.model_shape is None:
            raise ValueError("save_prompt_adapter needs a prompt adapter that was attached to a model")
        num_layers, num_heads = adapter.model_shape
        config = _peft_common(num_layers, adapter.num_virtual_tokens, base_model_name_or_path)
        config.update(
            peft_type="PROMPT_TUNING",
            token_dim=adapter.prompt_embeddings.shape[1],
            num_attention_heads=num_heads,
            prompt_tuning_init="RANDOM",
            prompt_tuning_init_text=None,
            tokenizer_name_or_path=None,
            tokenizer_kwargs=None,
        )
        tensors = {"prompt_embeddings": adapter.prompt_embeddings.detach()}
    elif not isinstance(adapter, PrefixAdapter):
        raise TypeError(f"expected a PromptTuningAdapter or PrefixAdapter, got {type(adapter).__name__}")
    else:
        table = adapter.kv_table().detach()
        plain = adapter.gate is None and adapter.folded_logit_bias is None
        if plain and adapter.layers == list(range(adapter.num_layers)):
            config = _peft_common(adapter.num_layers, adapter.num_virtual_tokens, base_model_name_or_path)
            config.update(
                peft_type="PREFIX_TUNING",
                token_dim=adapter.num_kv_heads * adapter.head_dim,
                num_attention_heads=adapter.num_kv_heads,
                encoder_hidden_size=adapter.encoder_hidden_size,
                prefix_projection=adapter.prefix_projection,
                init_weights=None,
            )
            tensors = {"prompt_embeddings": table.reshape(adapter.num_virtual_tokens, -1)}
        else:
            config = {
                "peft_type": GATED_PREFIX_TYPE,
                "format_version": 1,
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model_name_or_path,
                "num_virtual_tokens": adapter.num_virtual_tokens,
                "num_layers": adapter.num_layers,
                "num_key_value_heads": adapter.num_kv_heads,
                "head_dim": adapter.head_dim,
                "layers": adapter.layers,
                "folded": adapter.gate is None,
                "gate": None,
            }
            tensors = {"prefix_kv": table}
            if adapter.gate is not None:
                config["gate"] = {"kind": adapter.gate.kind, **adapter.gate.hyperparameters()}
                tensors[_GATE_TENSOR[adapter.gate.kind]] = next(adapter.gate.parameters()).detach()
            elif adapter.folded_logit_bias is not None:
                tensors["prefix_logit_bias"] = adapter.folded_logit_bias.detach()
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_NAME))


def _read(directory: Path, allow_pickle: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"no {CONFIG_NAME} in {directory}")
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got a {type(config).__name__}")
    if (directory / WEIGHTS_NAME).is_file():
        return config, load_file(str(directory / WEIGHTS_NAME))
    if (directory / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise ValueError(f"{directory / PICKLE_NAME} is a pickle; pass allow_pickle=True to read it (weights only)")
        return config, torch.load(directory / PICKLE_NAME, map_location="cpu", weights_only=True)
    raise ValueError(f"no {WEIGHTS_NAME} in {directory}")


def _tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], directory: Path) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"{directory / WEIGHTS_NAME} has no tensor {name!r} (found {sorted(tensors)})")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} in {directory} has shape {tuple(t.shape)} but this model needs {shape}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"{name} in {directory} holds NaN/inf values (a diverged run?); refusing to load it")
    return t


def load_prompt_adapter(
    model: nn.Module, directory: str | os.PathLike, allow_pickle: bool = False
) -> PromptTuningAdapter | PrefixAdapter:
    """Read an adapter saved by us or by PEFT and attach it to ``model`` (in place); returns it."""
    directory = Path(directory)
    config, tensors = _read(directory, allow_pickle)
    peft_type = config.get("peft_type")
    p = int(config.get("num_virtual_tokens", 0))
    if peft_type == "PROMPT_TUNING":
        if config.get("num_transformer_submodules", 1) != 1:
            raise ValueError("prompt tuning with num_transformer_submodules != 1 (encoder-decoder) is not supported")
        hidden = model.get_input_embeddings().weight.shape[1]
        prompt = _tensor(tensors, "prompt_embeddings", (p, hidden), directory)
        return attach_prompt_adapter(model, PromptTuningAdapter(prompt.float().clone()))
    num_layers, kv_heads, head_dim = model_geometry(model)
    if peft_type == "PREFIX_TUNING":
        saved = (
            config.get("num_layers"),
            config.get("num_attention_heads"),
            config.get("token_dim", 0) // max(config.get("num_attention_heads") or 1, 1),
        )
        if saved != (num_layers, kv_heads, head_dim):
            raise ValueError(
                f"prefix saved for (num_layers, num_key_value_heads, head_dim) = {saved} but the model "
                f"has {(num_layers, kv_heads, head_dim)}"
            )
        flat = _tensor(tensors, "prompt_embeddings", (p, num_layers * 2 * kv_heads * head_dim), directory)
        adapter = PrefixAdapter(num_layers, kv_heads, head_dim, p)
        with torch.no_grad():
            adapter.prefix_embeddings.copy_(flat)
        return attach_prefix_adapter(model, adapter)
    if peft_type == GATED_PREFIX_TYPE:
        if config.get("format_version") != 1:
            raise ValueError(f"unknown {GATED_PREFIX_TYPE} format_version {config.get('format_version')!r}")
        saved = (config["num_layers"], config["num_key_value_heads"], config["head_dim"])
        if saved != (num_layers, kv_heads, head_dim):
            raise ValueError(
                f"prefix saved for (num_layers, num_key_value_heads, head_dim) = {saved} but the model "
                f"has {(num_layers, kv_heads, head_dim)}"
            )
        layers = list(config["layers"])
        table = _tensor(tensors, "prefix_kv", (p, len(layers), 2, kv_heads, head_dim), directory)
        # a folded adapter may have pruned every layer: build with one, then install the saved table
        adapter = PrefixAdapter(num_layers, kv_heads, head_dim, p, layers=layers or [0])
        adapter.layers = layers
        adapter.prefix_embeddings = nn.Parameter(table.reshape(p, table[0].numel()).float().clone())
        gate = config.get("gate")
        if gate is not None:
            kind = gate["kind"]
            params = {k: v for k, v in gate.items() if k != "kind"}
            factory = {"sigmoid": SigmoidGate, "hard_concrete": HardConcreteGate}.get(kind)
            if factory is None:
                raise ValueError(f"unknown gate kind {kind!r} in {directory / CONFIG_NAME}")
            adapter.gate = factory(len(layers), **params)
            with torch.no_grad():
                next(adapter.gate.parameters()).copy_(_tensor(tensors, _GATE_TENSOR[kind], (len(layers),), directory))
        elif "prefix_logit_bias" in tensors:
            adapter.folded_logit_bias = _tensor(tensors, "prefix_logit_bias", (len(layers),), directory).float().clone()
        return attach_prefix_adapter(model, adapter)
    raise ValueError(
        f"unsupported peft_type {peft_type!r} in {directory / CONFIG_NAME}; "
        f"expected PROMPT_TUNING, PREFIX_TUNING or {GATED_PREFIX_TYPE}"
    )
