"""Shared by the PEFT-path tests: tiny bnb 4-bit Llamas, bnb's CPU repack, counting fastpeft's fused ops."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.profiler import profile

from fastpeft.kernels.nf4 import NF4Weight

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """A random 2-layer Llama (hidden 64, GQA 4/2 heads; every in_features a multiple of 64, as
    bitsandbytes' CPU 4-bit matmul needs), fp32 on CPU, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).train()


def token_ids(batch: int = 2, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def fused_op_calls(fn) -> int:
    """How many times fastpeft's fused LoRA op ran inside ``fn()``, from the torch profiler's events:
    the ``fastpeft::`` LoRA ops where they are registered as torch.library ops, else the op's
    autograd Function (``LoRALinearFn``). Backward events are not counted."""
    with profile() as prof:
        fn()
    names = [e.name for e in prof.events()]
    library_ops = [n for n in names if n.startswith("fastpeft::") and "lora" in n and "backward" not in n]
    if library_ops:
        return len(library_ops)
    return sum(n == "LoRALinearFn" for n in names)


def load_4bit(directory: Path, double_quant: bool) -> nn.Module:
    """A transformers model loaded from ``directory`` with bitsandbytes NF4 (fp32 compute), on CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=double_quant,
    )
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu")


def linear4bits(model: nn.Module) -> list[nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@torch.no_grad()
def repack_like_bitsandbytes(model: nn.Module, ids: torch.Tensor) -> None:
    """Put every Linear4bit into bnb's CPU-kernel layout: through bnb's own eval forward where this
    CPU supports it (AVX512-BF16), else by calling the same bnb function that forward calls."""
    import bitsandbytes.functional as bnbf

    was_training = model.training
    model.eval()
    model(input_ids=ids)
    model.train(was_training)
    for layer in linear4bits(model):
        state = layer.weight.quant_state
        if not getattr(state, "packing_format_for_cpu", False):
            layer.weight.data, layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu(layer.weight.data, state)
        assert layer.weight.quant_state.packing_format_for_cpu


@torch.no_grad()
def bf16_scale_reference(model: nn.Module) -> nn.Module:
    """A copy of a (not repacked) 4-bit model whose block scales are what bnb's CPU repack keeps: the
    fp32 absmax (double quant undone) rounded to bf16, stored without double quant. Independent of
    fastpeft's restore code; bnb's CPU repack is disabled on the copy."""
    reference = copy.deepcopy(model)
    for layer in linear4bits(reference):
        state = layer.weight.quant_state
        state.absmax = NF4Weight.from_bnb(layer.weight).absmax_fp32().to(torch.bfloat16).float()
        state.nested, state.state2, state.offset = False, None, None
        layer.support_avx512bf16_for_cpu = False
    return reference


def no_repack(model: nn.Module) -> nn.Module:
    """Keep bnb from repacking ``model``'s Linear4bit layers on an eval CPU forward (a no-op without them)."""
    for layer in linear4bits(model):
        layer.support_avx512bf16_for_cpu = False
    return model


def randomize_lora(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Non-zero random LoRA factors (and DoRA magnitudes near their init) in a PEFT model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator).tanh())


def grads_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def is_repacked(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
