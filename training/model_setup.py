"""Building blocks of a training run: device, model, adapters, optimizer, scheduler.

Optimizers: ``adamw`` / ``sgd`` from torch; ``adamw_8bit``, ``paged_adamw``, ``paged_adamw_8bit``
from bitsandbytes (imported only when asked for; the paged ones need CUDA). Schedulers come from
``transformers.get_scheduler`` by name (``linear``, ``cosine``, ``constant``,
``constant_with_warmup``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTIMIZERS = ("adamw", "sgd", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
FINETUNE_MODES = ("lora", "qlora", "full")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device("cpu")


def build_model(
    model: str | None,
    model_config: dict | None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> nn.Module:
    """A causal LM from a local Hugging Face directory, or freshly initialised from a config dict
    such as ``{"model_type": "llama", "hidden_size": 64, ...}`` (seeded; no download either way)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if (model is None) == (model_config is None):
        raise ValueError("give exactly one of `model` (a local directory) or `model_config` (a dict)")
    if model is not None:
        if not Path(model).is_dir():
            raise FileNotFoundError(f"model directory {model!r} does not exist (downloads are not attempted)")
        return AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    values = dict(model_config)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError("model_config needs a 'model_type' such as 'llama'")
    cfg = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype], attn_implementation=attn_implementation)


def load_saved_model(model_dir: str | Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a directory a run saved with ``save_pretrained`` (model + tokenizer)."""
    from fastpeft.training.tokenizer import load_tokenizer

    return build_model(str(model_dir), None), load_tokenizer(str(model_dir))


def apply_finetune_mode(model: nn.Module, finetune: str, lora: dict[str, Any]) -> bool:
    """Make ``model`` trainable per ``finetune``; returns True when adapters were injected.

    ``lora``/``qlora`` inject ``fastpeft.LoraConfig(**lora)`` (``qlora`` adds ``quantize="nf4"``);
    ``full`` trains every parameter. A model that already has fastpeft adapters is left as is.
    """
    import fastpeft

    if finetune not in FINETUNE_MODES:
        raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
    if finetune == "full":
        model.requires_grad_(True)
        return False
    if fastpeft.list_adapters(model):
        return True
    kwargs = {"target_modules": "all-linear", "r": 16, "lora_alpha": 32, **lora}
    if finetune == "qlora":
        kwargs["quantize"] = "nf4"
    fastpeft.inject(model, fastpeft.LoraConfig(**kwargs))
    return True


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every block (transformers renamed the method in
    5.2x; the old name still exists but warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_optimizer(
    name: str,
    params: list[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
) -> torch.optim.Optimizer:
    """An optimizer over ``params`` by name (see the module docstring)."""
    if not params:
        raise ValueError("no trainable parameters: check finetune mode and the adapter's target_modules")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=betas[0])
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name.startswith("paged") and device.type != "cuda":
        raise ValueError(f"optimizer {name!r} pages its state through CUDA unified memory and needs a CUDA device")
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as err:
        raise ImportError(f"optimizer {name!r} needs bitsandbytes") from err
    cls = {
        "adamw_8bit": bnb_optim.AdamW8bit,
        "paged_adamw": bnb_optim.PagedAdamW,
        "paged_adamw_8bit": bnb_optim.PagedAdamW8bit,
    }[name]
    return cls(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    """``transformers.get_scheduler`` with a clear error for unknown names."""
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    valid = [s.value for s in SchedulerType]
    if name not in valid:
        raise ValueError(f"scheduler must be one of {valid}, got {name!r}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
