"""Our implementations, bound by name in this one place.

Kernels, and the measuring functions beside this module (``training_steps``, ``sampling_throughput``),
are looked up here; while one is missing (or fails to import) its row says "not available in this
build (...)" and the run goes on.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch

from .harness import Measured, PeakMemory, not_available

# candidate (module, function name) pairs: the first one found is used
PREFIX_ATTENTION = (("fastpeft.kernels.prefix_attention", "prefix_attention"),)
QLORA_STEP = ((f"{__package__}.training_steps", "run_training_steps"),)
SAMPLING = ((f"{__package__}.sampling_throughput", "measure_sampling_throughput"),)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bind(candidates: tuple[tuple[str, str], ...]) -> Callable[..., Any]:
    """The first importable ``module.name`` of ``candidates``, else ``Unavailable("not available in this build ...")``."""
    broken = []  # modules that exist but fail to import: worth showing
    for module, name in candidates:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module.startswith(exc.name):
                broken.append(f"{module}: {type(exc).__name__}: {exc}")  # a dependency of the module is missing
            continue
        except Exception as exc:  # a half-written module is "not available", not a crash of the run
            broken.append(f"{module}: {type(exc).__name__}: {exc}")
            continue
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    tried = ", ".join(f"{m}.{n}" for m, n in candidates[:2]) + (", ..." if len(candidates) > 2 else "")
    raise not_available(tried, broken[0] if broken else "not written yet")


def call_with_supported(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments its signature accepts (optional knobs may be absent)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def lora_linear_ops() -> dict[str, Callable[..., Any]]:
    """The fused (Q)LoRA linear op, NF4 quantization and the exact dequantization for checks."""
    from fastpeft.kernels.backend import backend
    from fastpeft.kernels.lora_linear import lora_linear
    from fastpeft.kernels.nf4 import quantize_nf4
    from fastpeft.kernels.nf4_dequantize import dequantize_nf4_reference

    return {
        "lora_linear": lora_linear,
        "quantize_nf4": quantize_nf4,
        "dequantize_reference": dequantize_nf4_reference,
        "backend": backend,
    }


def prefix_attention() -> Callable[..., torch.Tensor]:
    """``prefix_attention(q, k, v, prefix_k, prefix_v)``: q/k/v ``[B, H, T, D]``, prefix ``[P, H, D]``."""
    return bind(PREFIX_ATTENTION)


def kernel_backend(t: torch.Tensor) -> str:
    from fastpeft.kernels.backend import backend

    return backend(t)


def qlora_step(
    config: Any, batch: int, seq: int, device: torch.device, warmup: int, steps: int, **options: Any
) -> Measured:
    """Our whole QLoRA training step on ``config`` (the SFT recipe's measuring function).

    ``fn(llama_config, batch_size=, seq_len=, steps=, warmup_steps=, device=, **options)`` returns a
    dict (or object) with ``tokens_per_s`` and ``peak_memory_bytes``; ``options`` it does not take
    (e.g. ``design``) are dropped.
    """
    fn = bind(QLORA_STEP)
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # it takes LlamaConfig fields
    out = call_with_supported(
        fn, fields, batch_size=batch, seq_len=seq, steps=steps, warmup_steps=warmup, device=device, **options
    )
    return _measured(out, tokens=batch * seq)


def fastpeft_qlora_model(config: Any, device: torch.device) -> torch.nn.Module:
    """A random-weight bf16 Llama with fastpeft NF4 + LoRA (r 16, alpha 32, all 7 projections)."""
    from fastpeft.config import LoraConfig
    from fastpeft.inject import inject

    from .baselines import import_optional

    transformers = import_optional("transformers")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocate bf16 directly, as the HF baseline does
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_TARGETS, quantize="nf4")
    return inject(model, lora).eval()


def fastpeft_lora_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (dense, changed in place) with fastpeft LoRA (r 16, alpha 32, all 7 projections), training mode."""
    from fastpeft.config import LoraConfig
    from fastpeft.inject import inject

    return inject(model, LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_TARGETS)).train()


def sampling(model: torch.nn.Module, n: int, prompt_len: int, new_tokens: int, repeats: int) -> Measured:
    """Our batched KV-cache sampler on ``model``: median seconds of one call, tokens/s, peak memory."""
    from .baselines import model_bytes

    fn = bind(SAMPLING)
    device = model.get_input_embeddings().weight.device
    with PeakMemory(device) as window:
        out = call_with_supported(fn, model, prompt_len=prompt_len, new_tokens=new_tokens, n=n, repeats=repeats)
    measured = _measured(out, tokens=n * new_tokens)
    if window.peak is not None:
        measured.peak_mem_bytes = window.peak + model_bytes(model)
    return measured


def _measured(out: Any, tokens: int) -> Measured:
    """A :class:`Measured` from a result with ``tokens_per_s`` (and maybe peak memory) for ``tokens`` tokens."""
    out = out if isinstance(out, dict) else vars(out)
    if "tokens_per_s" not in out:
        raise KeyError(f"the measuring function returned no tokens_per_s (keys: {sorted(out)})")
    tokens_per_s = float(out["tokens_per_s"])
    peak = out.get("peak_memory_bytes", out.get("peak_mem_bytes"))
    return Measured(
        median_ms=tokens / tokens_per_s * 1e3,
        peak_mem_bytes=None if peak is None else int(peak),
        extra={"tokens_per_s": tokens_per_s, "tokens": tokens},
    )
