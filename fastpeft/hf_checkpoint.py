"""``save_pretrained`` for a transformers model after :func:`fastpeft.inject`, as a PeftModel saves.

:func:`fastpeft.inject` gives every transformers ``PreTrainedModel`` it touches this
``save_pretrained`` (an attribute of that instance; the class is untouched), so
``model.save_pretrained(d)``, ``Trainer.save_model()`` and every Trainer checkpoint write:

- ``adapter_config.json`` + ``adapter_model.safetensors``: each adapter in PEFT's format (the
  adapter named ``default`` in ``d``, any other in ``d/<name>``, PEFT's layout), plus
  ``fastpeft_config.json`` where the adapter needs more than PEFT records (an NF4 base fastpeft
  quantized: ``quantize``, ``double_quant``, ``blocksize``, ``compute_dtype``);
- ``fastpeft_trainable.safetensors`` + ``model.safetensors.index.json``: every adapter tensor and
  every trainable parameter under the model's own ``state_dict`` keys, which is what
  ``Trainer(resume_from_checkpoint=...)`` loads into a model that is not a PeftModel (transformers
  then logs the base weights as "missing keys": they are not in the checkpoint and stay as loaded).

The base weights are never written (as with PEFT). Reload with the documented call
``fastpeft.load_adapter(base_model, d)`` (it reads ``fastpeft_config.json`` and re-quantizes an NF4
base exactly as before), or ``peft.PeftModel.from_pretrained(base_model, d)``. A model whose
adapters are all merged and unloaded saves as a plain transformers model again. Delta-LoRA, which
changes the base weights, is refused (merge and save the full model).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

TRAINABLE_NAME = "fastpeft_trainable.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME
_ADAPTER_KEY_PARTS = (".adapters.", ".copies.")  # AdapterLinear adapters, ModulesToSave copies


def install_save_pretrained(model: nn.Module) -> None:
    """Give a transformers model instance the adapter-aware ``save_pretrained`` (idempotent)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    if isinstance(model, PreTrainedModel) and "save_pretrained" not in model.__dict__:
        model.save_pretrained = types.MethodType(save_pretrained, model)


def trainable_state(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a resumed run needs: adapters, modules_to_save copies, trainable parameters."""
    state = model.state_dict() if state_dict is None else state_dict
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable or any(part in k for part in _ADAPTER_KEY_PARTS)}


def save_pretrained(
    self: nn.Module,
    save_directory: str | Path,
    *args: Any,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """Write this model's adapters in PEFT's format and its trainable state (see the module docstring)."""
    from fastpeft.adapter_io import save_adapter
    from fastpeft.inject import adapter_configs
    from fastpeft.lifecycle import list_adapters

    if not list_adapters(self):  # everything merged and unloaded: a plain transformers model again
        return type(self).save_pretrained(
            self, save_directory, *args, is_main_process=is_main_process, state_dict=state_dict, **kwargs
        )
    delta = [name for name, config in adapter_configs(self).items() if config.variant == "delta_lora"]
    if delta:
        raise ValueError(
            f"adapter(s) {delta} are Delta-LoRA, which updates the base weights; an adapter file cannot "
            "hold them: fastpeft.merge_and_unload(model) and save the full model"
        )
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "save_pretrained(push_to_hub=True) is not supported for a fastpeft model; save the "
            "directory, then upload it with huggingface_hub"
        )
    if not is_main_process:
        return
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in list_adapters(self):
        save_adapter(self, directory if name == "default" else directory / name, name)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in trainable_state(self, state_dict).items()}
    save_file(tensors, str(directory / TRAINABLE_NAME), metadata={"format": "pt"})
    index = {
        "metadata": {
            "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
            "fastpeft": "trainable tensors only; the base weights come from the base model",
        },
        "weight_map": dict.fromkeys(sorted(tensors), TRAINABLE_NAME),
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
