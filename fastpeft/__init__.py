"""fastpeft: kernel-accelerated adapters for LLM post-training.

Importing fastpeft initialises no CUDA context and compiles nothing.
"""

__version__ = "0.1.0"

# adapters: modules, config, surgery, PEFT-format I/O, lifecycle
from fastpeft.adapter_io import load_adapter, save_adapter
from fastpeft.config import LoraConfig
from fastpeft.inject import inject, trainable_parameters
from fastpeft.lifecycle import (
    active_adapter, add_adapter, delete_adapter, disable_adapters, list_adapters, merge, merge_and_unload,
    route_adapters, set_adapter, unmerge,
)  # fmt: skip
from fastpeft.lora_linear import AdapterLinear, LoRALinear
from fastpeft.qlora_linear import QLoRALinear

# the PEFT path: fastpeft's kernels behind a real peft.PeftModel, and the conversion to one
from fastpeft.peft_convert import as_peft_model
from fastpeft.peft_patch import PatchReport, patch_peft_model, unpatch_peft_model

# LoRA variants beyond LoRA and DoRA (each registers itself in fastpeft.variants when imported)
from fastpeft.adalora import AdaLoraAdapter, orthogonal_regularization, update_and_allocate
from fastpeft.delta_lora import DeltaLoraAdapter, DeltaLoraUpdater

# prompt family: prompt tuning, prefix tuning (fused prefix attention), P-Tuning v2, mixed prompts
from fastpeft.mixed_prompts import MixedPromptsConfig, PTuningV2Config, add_mixed_prompts, add_ptuning_v2
from fastpeft.prefix_tuning import PrefixAdapter, PrefixTuningConfig, add_prefix_tuning
from fastpeft.prompt_io import load_prompt_adapter, save_prompt_adapter
from fastpeft.prompt_tuning import PromptTuningAdapter, PromptTuningConfig, add_prompt_tuning

__all__ = [
    # LoRA variants
    "AdaLoraAdapter",
    # adapters
    "AdapterLinear",
    "DeltaLoraAdapter",
    "DeltaLoraUpdater",
    "LoRALinear",
    "LoraConfig",
    # prompt family
    "MixedPromptsConfig",
    "PTuningV2Config",
    "PrefixAdapter",
    "PrefixTuningConfig",
    "PromptTuningAdapter",
    "PromptTuningConfig",
    "PatchReport",
    "QLoRALinear",
    "__version__",
    "active_adapter",
    "add_adapter",
    "add_mixed_prompts",
    "add_prefix_tuning",
    "add_prompt_tuning",
    "add_ptuning_v2",
    "as_peft_model",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "list_adapters",
    "load_adapter",
    "load_prompt_adapter",
    "merge",
    "merge_and_unload",
    "orthogonal_regularization",
    "patch_peft_model",
    "route_adapters",
    "save_adapter",
    "save_prompt_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
    "unpatch_peft_model",
    "update_and_allocate",
]
