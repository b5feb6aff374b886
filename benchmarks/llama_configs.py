"""The Llama configurations of the whole-model scenarios.

"8B" has the shape of Llama 3.1 8B (the ``config.json`` of ``meta-llama/Llama-3.1-8B`` on the
Hugging Face Hub: hidden 4096, 32 layers, intermediate 14336, 32 heads / 8 KV heads, vocabulary
128256); "1.2B" is a smaller Llama of our own choosing (hidden 2048, 16 layers, intermediate 8192,
16 heads / 8 KV heads, vocabulary 32000, about 1.2 B parameters). Random weights only: models are
built from these configs, never downloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .harness import Context

LLAMA_SIZES: dict[str, dict[str, int]] = {
    "1.2B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    ),
    # 30.0M parameters: whole-model CPU comparisons (lora-step --full)
    "30M": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=16000,
        max_position_embeddings=2048,
    ),
    # the CPU scenarios' model (33.6M parameters): big enough that the linears dominate a step
    "cpu-34M": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
        max_position_embeddings=2048,
    ),
    # CPU "--small" runs: checks that the harness works, not a timing
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    ),
}


def llama_config(size: str) -> Any:
    """A ``transformers.LlamaConfig`` for ``size`` (raises ``Unavailable`` without transformers)."""
    from .baselines import import_optional

    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown Llama size {size!r}; known: {', '.join(LLAMA_SIZES)}")
    transformers = import_optional("transformers")
    return transformers.LlamaConfig(**LLAMA_SIZES[size])


def formula_dims(size: str) -> dict[str, int]:
    """The dimensions the FLOP/byte formulas take, for ``size``."""
    c = LLAMA_SIZES[size]
    return dict(
        hidden=c["hidden_size"],
        intermediate=c["intermediate_size"],
        layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        kv_heads=c["num_key_value_heads"],
        vocab=c["vocab_size"],
    )


def checkpoint_dir(ctx: Context, size: str) -> str:
    """A random bf16 HF checkpoint of ``size``, written once per scenario run and deleted after it
    (``ctx.resources``): the 8B one is 16 GB, shared by its cases and by the baselines that load it."""
    from .baselines import random_llama_dir

    key = f"checkpoint-{size}"
    if key not in ctx.cache:
        ctx.cache[key] = ctx.resources.enter_context(random_llama_dir(llama_config(size), ctx.device))
    return ctx.cache[key]
