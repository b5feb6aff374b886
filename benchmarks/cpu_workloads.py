"""One call of each whole-model workload, ours and the baseline's, for the interleaved CPU scenarios.

Both sides start from the same random bf16 checkpoint (``baselines.random_llama_dir``): the baseline
loads it the way a user of transformers + bitsandbytes + PEFT does (NF4 with double quantization,
bf16 compute, LoRA r 16 alpha 32 on all 7 projections); ours loads the same weights and injects
fastpeft's adapters (``quantize="nf4"`` gives byte-identical NF4 weights). Each builder returns a
``run()`` that does one unit of work (a ``generate`` call, a training step) and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .baselines import LORA_ALPHA, LORA_RANK, hf_bnb_peft_model, import_optional
from .formulas import LLAMA_PROJECTIONS

DTYPE = torch.bfloat16


def hf_model(model_dir: str, quantized: bool, training: bool, device: torch.device) -> torch.nn.Module:
    """transformers (+ bitsandbytes NF4) + PEFT LoRA, as the anchors load it."""
    if quantized:
        return hf_bnb_peft_model(model_dir, device, training=training)
    transformers, peft = import_optional("transformers"), import_optional("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).to(device)
    lora = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, lora)
    return model.train() if training else model.eval()


def fastpeft_model(model_dir: str, quantized: bool, device: torch.device) -> torch.nn.Module:
    """The same checkpoint with fastpeft's LoRA (r 16, alpha 32, all 7 projections), NF4 when ``quantized``."""
    import fastpeft

    transformers = import_optional("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).to(device)
    config = fastpeft.LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=list(LLAMA_PROJECTIONS),
        quantize="nf4" if quantized else None,
    )
    return fastpeft.inject(model, config).eval()


def prompt_ids(num_prompts: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (num_prompts, length), generator=torch.Generator().manual_seed(0))


def ours_generate(
    model: torch.nn.Module, prompts: torch.Tensor, n: int, new_tokens: int, temperature: float
) -> Callable[[], Any]:
    """fastpeft's sampler: ``n`` continuations of each prompt, exactly ``new_tokens`` each."""
    from fastpeft.reasoning.sampler import Sampler
    from fastpeft.reasoning.types import SamplingParams

    sampler = Sampler(model, max_seq_len=prompts.shape[1] + new_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=0)
    ids = prompts.tolist()
    return lambda: sampler.generate_ids(ids, params, n, ignore_eos=True)


def hf_generate_call(
    model: torch.nn.Module, prompts: torch.Tensor, n: int, new_tokens: int, temperature: float
) -> Callable[[], Any]:
    """``model.generate`` on the prompts repeated ``n`` times (what HF users do for N samples)."""
    ids = prompts.repeat_interleave(n, dim=0).to(model.device)
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": 0,
    }
    # the distribution ours samples: temperature only (generate would add its default top-k of 50)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    kwargs.update(sampling if temperature > 0 else {"do_sample": False})

    def run() -> Any:
        with torch.no_grad():
            return model.generate(input_ids=ids, **kwargs)

    return run


def hf_training_step(model_dir: str, batch: int, seq: int, vocab: int, device: torch.device) -> Callable[[], Any]:
    """One HF + bnb + PEFT QLoRA step (gradient checkpointing, AdamW), as ``baselines.hf_qlora_step``."""
    model = hf_model(model_dir, quantized=True, training=True, device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def ours_training_step(model_dir: str, batch: int, seq: int, vocab: int, device: torch.device) -> Callable[[], Any]:
    """One step of the SFT recipe's stack on the same checkpoint: fastpeft QLoRA, gradient
    checkpointing, the fused LM-head loss (:class:`fastpeft.training.losses.CausalLMLoss`), AdamW."""
    from fastpeft.training.losses import CausalLMLoss
    from fastpeft.training.model_setup import build_optimizer, enable_gradient_checkpointing

    model = fastpeft_model(model_dir, quantized=True, device=device)
    enable_gradient_checkpointing(model)
    model.train()
    loss_module = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer("adamw", params, 1e-4, 0.0, (0.9, 0.999), 1e-8, device)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    positions = torch.arange(seq, device=device).expand(batch, -1)
    segments = torch.ones_like(ids)

    def step() -> float:
        loss_sum, n = loss_module(ids, ids, positions, segments)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss_sum.detach() / n)

    return step


def loss_inputs(
    rows: int, hidden: int, vocab: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[rows, H]`` and an LM head ``[V, H]`` (bf16, requiring grad), labels ``[rows]``."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(device, DTYPE).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(device, DTYPE).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    return h, w, labels


def hf_loss_backward(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> Sequence[torch.Tensor]:
    """What ``LlamaForCausalLM(labels=...)`` does: bf16 logits, upcast, cross-entropy; then dH, dW."""
    logits = torch.nn.functional.linear(h, w)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def ours_loss_backward(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> Sequence[torch.Tensor]:
    from fastpeft.kernels.linear_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(h, w, labels)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def loss_reference64(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> Sequence[torch.Tensor]:
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    loss = torch.nn.functional.cross_entropy(h64 @ w64.t(), labels)
    return (loss.detach(), *torch.autograd.grad(loss, (h64, w64)))
