"""Adapter layers follow torch.autocast like nn.Linear: bf16 compute, fp32 master gradients."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastpeft
from fastpeft import LoraConfig

CFG = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=64,
)
VARIANTS = {
    "lora": {},
    "qlora": {"quantize": "nf4"},
    "qlora_double_quant": {"quantize": "nf4", "double_quant": True},
    "dora": {"use_dora": True},
    "qdora": {"use_dora": True, "quantize": "nf4"},
    "adalora": {"variant": "adalora", "variant_config": {"total_step": 10, "target_r": 2}},
    "delta_lora": {"variant": "delta_lora"},
    "dropout": {"lora_dropout": 0.1},
}


def _model(extra: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG, attn_implementation="sdpa"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], **extra)
    fastpeft.inject(model, config)
    for name, param in model.named_parameters():  # a non-trivial adapter: B = 0 would hide dtype bugs
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def _loss_and_grads(model, ids, amp):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), logits, grads


@pytest.mark.parametrize("name", list(VARIANTS))
def test_autocast_bf16_matches_fp32_with_fp32_master_grads(name):
    model = _model(VARIANTS[name])
    model.train(name == "dropout")
    ids = torch.randint(0, CFG["vocab_size"], (2, 11))
    torch.manual_seed(1)
    loss32, _, grads32 = _loss_and_grads(model, ids, amp=False)
    torch.manual_seed(1)
    loss16, logits16, grads16 = _loss_and_grads(model, ids, amp=True)
    assert logits16.dtype == torch.bfloat16  # the LM head and our layers ran in bf16
    assert grads16 and all(g is not None for g in grads16.values()), "a trainable tensor got no gradient"
    for n, g in grads16.items():
        param = dict(model.named_parameters())[n]
        assert g.dtype == param.dtype == torch.float32, n  # master weights and their grads stay fp32
        assert torch.isfinite(g).all(), n
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[n].flatten() for n in grads32])
    cos = torch.nn.functional.cosine_similarity(flat32.double(), flat16.double(), dim=0)
    assert cos > 0.99, f"bf16 gradients point elsewhere (cosine {float(cos):.4f})"


def test_bf16_layers_accept_fp32_inputs_only_under_autocast():
    model = _model({"quantize": "nf4"}).to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, CFG["hidden_size"])
    with pytest.raises(TypeError, match=r"float32.*bfloat16"):
        layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, layer(x.to(torch.bfloat16)), rtol=0, atol=0)


@pytest.mark.triton
def test_autocast_reaches_the_triton_path():
    model = _model({"quantize": "nf4"})
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(20, CFG["intermediate_size"], requires_grad=True)  # > 16 rows: the training regime
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    adapter = layer.adapters[layer.active_adapter]
    assert adapter.lora_A.grad.dtype == torch.float32 and torch.isfinite(adapter.lora_A.grad).all()
    ref = copy.deepcopy(layer).to(torch.bfloat16)(x.detach().to(torch.bfloat16))  # bf16 layer, no autocast
    torch.testing.assert_close(y.detach(), ref.detach(), rtol=0, atol=0)
