"""fastpeft: kernel-accelerated adapters for LLM post-training.

Importing fastpeft initialises no CUDA context and compiles nothing. The public names, by family:

- adapters: ``LoraConfig``, ``inject``, ``LoRALinear``, ``QLoRALinear``, PEFT-format ``save_adapter`` /
  ``load_adapter`` and the lifecycle (``add_adapter``, ``set_adapter``, ``merge``, ``route_adapters``, ...);
- the PEFT path: ``patch_peft_model`` (fastpeft's kernels behind a real ``peft.PeftModel``) and
  ``as_peft_model`` (a PeftModel view of an injected model, for TRL);
- LoRA variants beyond LoRA and DoRA (AdaLoRA, Delta-LoRA; each registers itself in
  :mod:`fastpeft.variants` when imported);
- the prompt family: prompt tuning, prefix tuning (fused prefix attention), P-Tuning v2, mixed prompts.
"""

__version__ = "0.1.0"

from fastpeft.adalora import AdaLoraAdapter, orthogonal_regularization, update_and_allocate
from fastpeft.adapter_io import load_adapter, save_adapter
from fastpeft.config import LoraConfig
from fastpeft.delta_lora import DeltaLoraAdapter, DeltaLoraUpdater
from fastpeft.inject import inject, trainable_parameters
from fastpeft.lifecycle import (
    active_adapter,
    add_adapter,
    delete_adapter,
    disable_adapters,
    list_adapters,
    merge,
    merge_and_unload,
    route_adapters,
    set_adapter,
    unmerge,
)
from fastpeft.lora_linear import AdapterLinear, LoRALinear
from fastpeft.mixed_prompts import MixedPromptsConfig, PTuningV2Config, add_mixed_prompts, add_ptuning_v2
from fastpeft.peft_convert import as_peft_model
from fastpeft.peft_patch import PatchReport, patch_peft_model, unpatch_peft_model
from fastpeft.prefix_tuning import PrefixAdapter, PrefixTuningConfig, add_prefix_tuning
from fastpeft.prompt_io import load_prompt_adapter, save_prompt_adapter
from fastpeft.prompt_tuning import PromptTuningAdapter, PromptTuningConfig, add_prompt_tuning
from fastpeft.qlora_linear import QLoRALinear

__all__ = [  # noqa: RUF022 (grouped by family, as in the docstring)
    "__version__",
    # adapters
    "AdapterLinear",
    "LoRALinear",
    "LoraConfig",
    "QLoRALinear",
    "active_adapter",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "list_adapters",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "route_adapters",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
    # the PEFT path
    "PatchReport",
    "as_peft_model",
    "patch_peft_model",
    "unpatch_peft_model",
    # LoRA variants
    "AdaLoraAdapter",
    "DeltaLoraAdapter",
    "DeltaLoraUpdater",
    "orthogonal_regularization",
    "update_and_allocate",
    # prompt family
    "MixedPromptsConfig",
    "PTuningV2Config",
    "PrefixAdapter",
    "PrefixTuningConfig",
    "PromptTuningAdapter",
    "PromptTuningConfig",
    "add_mixed_prompts",
    "add_prefix_tuning",
    "add_prompt_tuning",
    "add_ptuning_v2",
    "load_prompt_adapter",
    "save_prompt_adapter",
]
