"""What a (Q)LoRA user runs today, in one place: the scenarios and the pytest-benchmark suites share it.

Each is what the libraries' users write, with their documented defaults:
- dense torch: ``F.linear`` on a frozen bf16 weight + PEFT's unfused LoRA ``(x·Aᵀ)·Bᵀ·s``;
- bitsandbytes: ``bnb.nn.Linear4bit`` NF4 (blocksize 64, double quant) + the same unfused LoRA;
- SDPA: causal without prefix, and the prefix concatenated into K/V with a boolean mask;
- HF transformers + bitsandbytes 4-bit + PEFT: a whole QLoRA training step, and ``generate``.

bitsandbytes, transformers and peft are imported inside the functions that need them; a missing
one raises :class:`harness.Unavailable` ("not installed: ..."), which the harness turns into a row.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from .formulas import LLAMA_PROJECTIONS
from .harness import Measured, PeakMemory, memory_kind, not_installed, synchronize

LORA_RANK, LORA_ALPHA = 16, 32


def import_optional(name: str) -> ModuleType:
    """Import an optional package, or raise ``Unavailable("not installed: <name>")``."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise not_installed(name) from exc


# ---------------------------------------------------------------------------------------------
# linear layers: x [M, K], W [N, K], A [r, K], B [N, r]


def dense_lora_linear(
    x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """PEFT's unfused LoRA on a dense frozen weight: ``F.linear(x, W) + F.linear(F.linear(x, A), B)·s``."""
    return F.linear(x, weight) + F.linear(F.linear(x, lora_A), lora_B) * scaling


def bnb_nf4_linear(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> torch.nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` (NF4) holding ``weight`` [N, K], quantized on ``weight.device``."""
    bnb = import_optional("bitsandbytes")
    n, k = weight.shape
    layer = bnb.nn.Linear4bit(
        k, n, bias=False, compute_dtype=weight.dtype, compress_statistics=double_quant, quant_type="nf4"
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach().cpu(),
        requires_grad=False,
        quant_type="nf4",
        blocksize=blocksize,
        compress_statistics=double_quant,
    )
    return layer.to(weight.device)  # bitsandbytes quantizes when the parameter moves to its device


def bnb_lora_linear(
    layer: torch.nn.Module, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """What PEFT runs on a bnb layer: ``Linear4bit(x) + (x·Aᵀ)·Bᵀ·s``."""
    return layer(x) + F.linear(F.linear(x, lora_A), lora_B) * scaling


def bnb_dequantized_fp32(layer: torch.nn.Module) -> torch.Tensor:
    """The exact weight ``[N, K]`` a bnb layer computes with, in fp32 (bnb's own dequantization)."""
    bnb = import_optional("bitsandbytes")
    state = copy.copy(layer.weight.quant_state)
    state.dtype = torch.float32  # same codes and scales, no rounding to bf16
    return bnb.functional.dequantize_4bit(layer.weight.data, state).float()


def bnb_dequantize(layer: torch.nn.Module) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` in the layer's compute dtype (the timed baseline)."""
    bnb = import_optional("bitsandbytes")
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def bnb_weight_bytes(layer: torch.nn.Module) -> int:
    """Device bytes of a bnb 4-bit weight: packed codes plus its quantization statistics."""
    state = layer.weight.quant_state
    tensors = [layer.weight.data, state.absmax]
    if getattr(state, "nested", False):
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# attention: q, k, v [B, H, T, D]; a prefix shared by the batch, prefix_k / prefix_v [P, H, D]


def prefix_mask(t: int, p: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[T, P + T]``: every query sees the P prefix keys, then the sequence causally."""
    mask = torch.ones(t, p + t, dtype=torch.bool, device=device)
    mask[:, p:] = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return mask


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(..., is_causal=True)``, no prefix: the causal fast path."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_prefix_concat(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """What prefix tuning does today: expand the prefix to the batch, concatenate into K/V, boolean mask."""
    b = q.shape[0]
    k2 = torch.cat([prefix_k.permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1), k], dim=2)
    v2 = torch.cat([prefix_v.permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1), v], dim=2)
    return F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# whole models: HF transformers + bitsandbytes 4-bit + PEFT LoRA (r 16, alpha 32, all 7 projections)


@contextlib.contextmanager
def random_llama_dir(config: Any, device: torch.device) -> Iterator[str]:
    """A temporary HF checkpoint of a randomly initialised bf16 Llama (built on ``device``), deleted after."""
    transformers = import_optional("transformers")
    directory = tempfile.mkdtemp(prefix="fastpeft-bench-model-")
    try:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # allocate bf16 directly: an 8B fp32 copy would not fit
        try:
            with torch.device(device):
                model = transformers.LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(directory)
        del model
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def hf_bnb_peft_model(model_dir: str, device: torch.device, training: bool) -> torch.nn.Module:
    """Load ``model_dir`` in bnb NF4 (bf16 compute) and wrap it with PEFT LoRA (r 16, alpha 32, all 7
    projections), the recipe of PEFT's and bitsandbytes' QLoRA guides.

    Training adds ``prepare_model_for_kbit_training`` (gradient checkpointing on) and ``model.train()``.
    """
    transformers = import_optional("transformers")
    import_optional("bitsandbytes")
    peft = import_optional("peft")
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map=device_map
    )
    if training:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, lora)
    return model.train() if training else model.eval()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (bnb 4-bit weights count their packed bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def timed_steps(step: Any, steps: int, device: torch.device) -> list[float]:
    """Wall seconds of each of ``steps`` calls of ``step()``, synchronised on CUDA."""
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def hf_qlora_step(
    model_dir: str, vocab: int, batch: int, seq: int, device: torch.device, warmup: int = 2, steps: int = 5
) -> Measured:
    """Median time of one HF + bnb + PEFT QLoRA step (AdamW lr 1e-4, labels = inputs, ``warmup``
    untimed steps first).

    ``model_dir`` holds a bf16 checkpoint (:func:`random_llama_dir`). Peak memory: absolute
    ``max_memory_allocated`` over the timed steps on CUDA (model, optimizer and activations: what a
    user sees as the memory a run needs); on CPU the RSS rise from before the model was loaded.
    """
    on_cpu = device.type != "cuda"
    with PeakMemory(device) if on_cpu else contextlib.nullcontext() as cpu_window:
        model = hf_bnb_peft_model(model_dir, device, training=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        losses = []

        def step() -> None:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())

        for _ in range(warmup):
            step()
        with contextlib.nullcontext() if on_cpu else PeakMemory(device, absolute=True) as gpu_window:
            times = timed_steps(step, steps, device)
        model = opt = None  # the step closure's cells too: frees them before the next measurement
    median_ms = statistics.median(times) * 1e3
    return Measured(
        median_ms=median_ms,
        peak_mem_bytes=(cpu_window or gpu_window).peak,
        extra={
            "tokens_per_s": batch * seq / (median_ms * 1e-3),
            "tokens_per_step": batch * seq,
            "final_loss": losses[-1],
            "mem": memory_kind(device) + ("" if on_cpu else " (absolute)"),
        },
    )


def hf_generate(
    model: torch.nn.Module, n_seq: int, prompt_len: int, new_tokens: int, vocab: int, device: torch.device
) -> Measured:
    """Time one ``model.generate`` (sampling, exactly ``new_tokens`` per row) after a short warm-up.

    Peak memory = the model's bytes + what generation allocates above them.
    """
    ids = torch.randint(0, vocab, (n_seq, prompt_len), device=device)
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": True, "pad_token_id": 0}
    warm = min(16, new_tokens)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=warm, min_new_tokens=warm, **kwargs)
        with PeakMemory(device) as window:
            start = time.perf_counter()
            out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            synchronize(device)
            seconds = time.perf_counter() - start
    produced = (out.shape[1] - prompt_len) * n_seq
    peak = None if window.peak is None else window.peak + model_bytes(model)
    return Measured(
        median_ms=seconds * 1e3, peak_mem_bytes=peak, extra={"tokens_per_s": produced / seconds, "new_tokens": produced}
    )


def peft_lora_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a dense transformers model, wrapped in place) with PEFT LoRA (r 16, alpha 32, all 7
    projections, no dropout), in training mode."""
    peft = import_optional("peft")
    lora = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, lora).train()


def adapter_train_step(model: torch.nn.Module, ids: torch.Tensor) -> Any:
    """One training step of ``model``'s trainable parameters (labels = inputs, AdamW lr 1e-4), as a
    callable: forward, backward, optimizer step; the same for every implementation compared."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
