"""Tiny causal LMs built from transformers configs (never the hub) and float64 references for them."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")
_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def build_tiny_lm(arch: str, seed: int = 0, num_layers: int = 2, intermediate_size: int = 96) -> nn.Module:
    """A randomly initialised tiny causal LM of ``arch`` in eval mode, fp32 on CPU.

    (bitsandbytes' CPU 4-bit matmul needs in_features divisible by 64: pass intermediate_size=128.)"""
    import transformers as tf

    torch.manual_seed(seed)
    common = {**_COMMON, "num_hidden_layers": num_layers, "intermediate_size": intermediate_size}
    if arch == "gpt2":
        config = tf.GPT2Config(
            n_embd=64, n_layer=num_layers, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = tf.GPT2LMHeadModel(config)
    else:
        config_cls, model_cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        }[arch]
        extra = {"head_dim": 16} if arch in ("qwen3", "gemma") else {}
        model = model_cls(config_cls(**common, **extra))
    return model.eval()


def token_batch(batch: int = 2, seq: int = 5, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, seq), generator=generator)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Fill every adapter tensor (A, B, DoRA magnitude) with fresh non-zero random values."""
    from fastpeft.lora_linear import iter_adapter_layers

    generator = torch.Generator().manual_seed(seed)
    for _, layer in iter_adapter_layers(model):
        for adapter in layer.adapters.values():
            for name, param in adapter.named_parameters():
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                if name == "magnitude":  # keep it near the row norms, positive
                    param.copy_(param.double() * (1 + 0.2 * noise.tanh()))
                else:
                    param.copy_(scale * noise)


@torch.no_grad()
def float64_reference(base: nn.Module, adapted: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """A float64 copy of ``base`` whose adapted weights are written out by hand:
    W' = W + s·B·A (LoRA, rsLoRA) or (m / ||W + s·B·A||_row) ⊙ (W + s·B·A) (DoRA)."""
    from fastpeft.dora import DoraAdapter
    from fastpeft.lora_linear import iter_adapter_layers
    from fastpeft.qlora_linear import QLoRALinear

    reference = copy.deepcopy(base).double()
    for path, layer in iter_adapter_layers(adapted):
        name = adapter_name or layer.active_adapter
        module = reference.get_submodule(path)
        if name not in layer.adapters:
            if isinstance(layer, QLoRALinear):  # adapter-less NF4 layer
                w = layer.dense_weight(torch.float32).double()
                module.weight.copy_(w.t() if layer.fan_in_fan_out else w)
            continue
        adapter = layer.adapters[name]
        if isinstance(layer, QLoRALinear):  # the reference uses the exact NF4 values
            w = layer.dense_weight(torch.float32).double()
        else:
            w = module.weight.t() if layer.fan_in_fan_out else module.weight  # [out, in]
        s = adapter.lora_alpha / (adapter.r**0.5 if adapter.use_rslora else adapter.r)
        merged = w + s * adapter.lora_B.double() @ adapter.lora_A.double()
        if isinstance(adapter, DoraAdapter):
            merged = (adapter.magnitude.double() / merged.norm(dim=1)).unsqueeze(1) * merged
        module.weight.copy_(merged.t() if layer.fan_in_fan_out else merged)
    return reference


def bnb_nf4(weight: torch.Tensor, double_quant: bool = True, blocksize: int = 64):
    """bitsandbytes' NF4 quantization of ``weight`` as an NF4Weight: the independent reference for
    the bytes of a (re-)quantized weight."""
    from fastpeft.kernels.nf4 import NF4Weight

    functional = pytest.importorskip("bitsandbytes.functional")
    packed, state = functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    return NF4Weight.from_bnb(packed, state)


def assert_same_nf4(ours, theirs) -> None:
    """Two NF4Weights hold the same bytes (codes, block scales and, with double quant, their quantization)."""
    for field in ("packed", "absmax", "nested_absmax", "nested_code", "offset"):
        a, b = getattr(ours, field), getattr(theirs, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), field


@pytest.fixture
def nf4():
    """``nf4.bnb(weight, double_quant)`` (bitsandbytes' quantization) and ``nf4.assert_same(a, b)``."""
    return types.SimpleNamespace(bnb=bnb_nf4, assert_same=assert_same_nf4)


@pytest.fixture
def lm():
    """Helpers for whole-model tests: build, ids, logits, randomize, reference."""
    return types.SimpleNamespace(
        build=build_tiny_lm, ids=token_batch, logits=logits, randomize=randomize_adapters, reference=float64_reference
    )
