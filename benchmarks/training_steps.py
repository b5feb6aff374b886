"""Throughput and peak memory of N training steps of a Llama config with fastpeft's stack, for the
benchmark harness (``fastpeft bench qlora-step``) to put beside HF + bitsandbytes + PEFT.

The step is the SFT recipe's: :class:`fastpeft.training.losses.CausalLMLoss` (fused LM head +
cross-entropy), fastpeft adapters (``qlora``: NF4 base), AdamW, optional bf16 autocast and
gradient checkpointing, on random token ids (every token a target).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fastpeft.training.losses import CausalLMLoss
from fastpeft.training.metrics import peak_memory_bytes, reset_peak_memory
from fastpeft.training.model_setup import (
    apply_finetune_mode,
    build_model,
    build_optimizer,
    enable_gradient_checkpointing,
)
from fastpeft.training.step_design import StepDesign, apply_step_design


def run_training_steps(
    llama_config: dict[str, Any],
    steps: int = 10,
    batch_size: int = 1,
    seq_len: int = 2048,
    finetune: str = "qlora",
    lora: dict[str, Any] | None = None,
    device: str = "cuda",
    dtype: str = "bfloat16",
    bf16_autocast: bool = True,
    gradient_checkpointing: bool = True,
    warmup_steps: int = 2,
    loss_impl: str = "auto",
    seed: int = 0,
    design: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time ``steps`` optimizer steps after ``warmup_steps`` untimed ones.

    ``llama_config``: LlamaConfig fields (``hidden_size``, ``num_hidden_layers``, ...); random weights.
    Returns ``{"tokens_per_s", "peak_memory_bytes", "step_seconds", "loss", "trainable_params", ...}``;
    peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (reset before the timed steps: it
    includes the model and optimizer), the process RSS peak on CPU. ``design``: StepDesign fields
    (:mod:`fastpeft.training.step_design`); it replaces ``gradient_checkpointing`` when given.
    """
    if steps <= 0 or batch_size <= 0 or seq_len <= 1:
        raise ValueError(f"need steps > 0, batch_size > 0, seq_len > 1; got {steps}, {batch_size}, {seq_len}")
    dev = torch.device(device)
    cfg = {"model_type": "llama", **llama_config}
    model = build_model(None, cfg, dtype=dtype, attn_implementation="sdpa", seed=seed)
    lora_kwargs = {"r": 16, "lora_alpha": 32, **(lora or {})}
    if finetune == "qlora":
        lora_kwargs.setdefault("compute_dtype", dtype)
    apply_finetune_mode(model, finetune, lora_kwargs)
    model.to(dev)
    if design is not None:
        apply_step_design(model, StepDesign(**design))
        gradient_checkpointing = StepDesign(**design).gradient_checkpointing
    elif gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    loss_module = CausalLMLoss(model, loss_impl)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer("adamw", params, 1e-4, 0.0, (0.9, 0.999), 1e-8, dev)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(dev)
    positions = torch.arange(seq_len, device=dev).expand(batch_size, -1)
    segments = torch.ones_like(ids)
    amp = torch.bfloat16 if bf16_autocast else None

    def one_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss_sum, n = loss_module(ids, ids, positions, segments)
        (loss_sum / n).backward()
        optimizer.step()
        return float(loss_sum.detach() / n)

    for _ in range(warmup_steps):
        one_step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    loss = float("nan")
    for _ in range(steps):
        loss = one_step()  # float() synchronises each step
    elapsed = time.perf_counter() - t0
    return {
        "tokens_per_s": steps * batch_size * seq_len / elapsed,
        "peak_memory_bytes": peak_memory_bytes(dev),
        "step_seconds": elapsed / steps,
        "loss": loss,
        "trainable_params": sum(p.numel() for p in params),
        "finetune": finetune,
        "loss_impl": loss_module.loss_impl,
        "device": str(dev),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "gradient_checkpointing": gradient_checkpointing,
        "design": design,
    }
