"""fastpeft: kernel-accelerated adapters for LLM post-training.

Importing fastpeft initialises no CUDA context and compiles nothing.
"""

__version__ = "0.1.0"

# adapters: modules, config, surgery, PEFT-format I/O, lifecycle
from fastpeft.adapter_io import load_adapter, save_adapter  # noqa: E402
from fastpeft.config import LoraConfig  # noqa: E402
from fastpeft.inject import inject, trainable_parameters  # noqa: E402
from fastpeft.lifecycle import (  # noqa: E402
    active_adapter, add_adapter, delete_adapter, disable_adapters, list_adapters, merge, merge_and_unload,
    route_adapters, set_adapter, unmerge,
)  # fmt: skip
from fastpeft.lora_linear import AdapterLinear, LoRALinear  # noqa: E402
from fastpeft.qlora_linear import QLoRALinear  # noqa: E402

# LoRA variants beyond LoRA and DoRA (each registers itself in fastpeft.variants when imported)
from fastpeft.adalora import AdaLoraAdapter, orthogonal_regularization, update_and_allocate  # noqa: E402
from fastpeft.delta_lora import DeltaLoraAdapter, DeltaLoraUpdater  # noqa: E402

# prompt family: prompt tuning, prefix tuning (fused prefix attention), P-Tuning v2, mixed prompts
from fastpeft.mixed_prompts import MixedPromptsConfig, PTuningV2Config, add_mixed_prompts, add_ptuning_v2  # noqa: E402
from fastpeft.prefix_tuning import PrefixAdapter, PrefixTuningConfig, add_prefix_tuning  # noqa: E402
from fastpeft.prompt_io import load_prompt_adapter, save_prompt_adapter  # noqa: E402
from fastpeft.prompt_tuning import PromptTuningAdapter, PromptTuningConfig, add_prompt_tuning  # noqa: E402
