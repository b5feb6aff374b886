"""TiledGatedMLP against a float64 reference: outputs and every gradient, tiles that do not divide M."""

from __future__ import annotations

import pytest
import torch
import transformers

import fastpeft
from fastpeft.kernels.nf4_dequantize import dequantize_nf4_reference
from fastpeft.kernels.workspace import get_workspace, isolated_workspaces
from fastpeft.lora_linear import AdapterLinear
from fastpeft.tiled_mlp import TiledGatedMLP, tile_gated_mlps

TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def _mlp(dtype: torch.dtype, quantize: str | None, targets: list[str], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32,
    )
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    fastpeft.inject(
        model,
        fastpeft.LoraConfig(r=5, lora_alpha=9, target_modules=targets, quantize=quantize, init_lora_weights=False),
    )
    return model.model.layers[0].mlp


def _dense64(layer: torch.nn.Module) -> torch.Tensor:
    if isinstance(layer, AdapterLinear) and hasattr(layer, "nf4_weight"):
        return dequantize_nf4_reference(layer.nf4_weight(), torch.float32).double()
    return (layer.weight if not isinstance(layer, AdapterLinear) else layer.dense_weight(layer.dtype)).double()


def _reference(mlp: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """down(silu(gate(x)) * up(x)) in float64 from the same weights; returns y and grads of (x, A, B...)."""
    leaves = []

    def proj(layer: torch.nn.Module, inp: torch.Tensor) -> torch.Tensor:
        out = inp @ _dense64(layer).t()
        if isinstance(layer, AdapterLinear) and layer.active_adapter in layer.adapters:
            a = layer.lora_A.detach().double().requires_grad_(True)
            b = layer.lora_B.detach().double().requires_grad_(True)
            leaves.extend([a, b])
            out = out + layer.scaling * (inp @ a.t()) @ b.t()
        return out

    x64 = x.detach().double().requires_grad_(True)
    y = proj(mlp.down_proj, torch.nn.functional.silu(proj(mlp.gate_proj, x64)) * proj(mlp.up_proj, x64))
    grads = torch.autograd.grad(y, [x64, *leaves], grad_y.double())
    return y, list(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("quantize", "targets"),
    [(None, ["gate_proj", "up_proj", "down_proj"]), ("nf4", ["gate_proj", "down_proj"])],
    ids=["lora", "qlora-partial"],
)
@pytest.mark.parametrize(("rows", "tile"), [(1, 4), (17, 4), (37, 16), (40, 64)])
def test_matches_float64_reference(dtype, quantize, targets, rows, tile):
    mlp = TiledGatedMLP(_mlp(dtype, quantize, targets), tile)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=gen).to(dtype).requires_grad_(True)
    grad_y = torch.randn(rows, 48, generator=gen).to(dtype)
    params = [p for p in mlp.parameters() if p.requires_grad]
    with isolated_workspaces():
        for name in ("nf4_dequant", "nf4_mlp_gate", "nf4_mlp_up", "nf4_mlp_down"):  # poisoned: every use rewrites them
            get_workspace(name, 72 * 48, dtype, torch.device("cpu")).fill_(float("nan"))
        y = mlp(x)
        grads = torch.autograd.grad(y, [x, *params], grad_y)
    ref_y, ref_grads = _reference(mlp, x, grad_y)
    atol, rtol = TOLERANCES[dtype]
    scale = ref_y.abs().max().item()
    torch.testing.assert_close(y.double(), ref_y, atol=atol * scale, rtol=rtol)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), ref, atol=atol * ref.abs().max().item(), rtol=rtol)
        assert got.dtype == dtype


def test_same_as_the_plain_module_and_swapped_into_a_model():
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
    )
    model = transformers.LlamaForCausalLM(cfg)
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    keys = set(model.state_dict())
    ids = torch.randint(0, 50, (2, 23))
    loss_ref = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        logits_ref = model(input_ids=ids).logits
    grads_ref = torch.autograd.grad(loss_ref, [p for p in model.parameters() if p.requires_grad])
    assert tile_gated_mlps(model, tile_rows=8) == 2
    assert set(model.state_dict()) == keys  # same module paths: adapters save and load as before
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, loss_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # tiled without autograd too (a checkpointed block's forward)
        torch.testing.assert_close(model(input_ids=ids).logits, logits_ref, rtol=1e-5, atol=1e-6)


def test_falls_back_where_the_fused_path_does_not_apply():
    mlp = _mlp(torch.float32, None, ["gate_proj", "up_proj", "down_proj"])
    mlp.gate_proj.adapters["default"].dropout = torch.nn.Dropout(0.5)  # dropout on the adapter input
    tiled = TiledGatedMLP(mlp, 4)
    x = torch.randn(9, 48)
    torch.manual_seed(0)
    y = tiled(x)
    torch.manual_seed(0)
    torch.testing.assert_close(y, tiled.plain_forward(x))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tile_rows"):
        TiledGatedMLP(_mlp(torch.float32, None, ["gate_proj"]), 0)
    with pytest.raises(TypeError, match="gated MLP"):
        TiledGatedMLP(torch.nn.Linear(3, 3), 4)
    tiled = TiledGatedMLP(_mlp(torch.float32, None, ["gate_proj"]), 4)
    with pytest.raises(ValueError, match="expects x"):
        tiled(torch.randn(3, 47, requires_grad=True))


@pytest.mark.triton
def test_triton_dequant_path_in_the_interpreter():
    mlp = TiledGatedMLP(_mlp(torch.float32, "nf4", ["gate_proj", "up_proj", "down_proj"]), 8)
    x = torch.randn(19, 48, requires_grad=True)
    grad_y = torch.randn(19, 48)
    params = [p for p in mlp.parameters() if p.requires_grad]
    with isolated_workspaces():
        grads = torch.autograd.grad(mlp(x), [x, *params], grad_y)
    _, ref_grads = _reference(mlp, x, grad_y)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), ref, atol=5e-5 * ref.abs().max().item(), rtol=5e-5)


@pytest.mark.gpu
def test_cuda_llama3_8b_mlp_against_float64():
    """An 8B MLP (4096 -> 14336, NF4 + LoRA r 16) over 4096 rows in 2048-row tiles, bf16 on a GPU."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=16,
    )
    with torch.device("cuda"):
        mlp = transformers.models.llama.modeling_llama.LlamaMLP(cfg).to(torch.bfloat16)
    holder = torch.nn.Module()
    holder.mlp = mlp
    fastpeft.inject(
        holder,
        fastpeft.LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["gate_proj", "up_proj", "down_proj"],
            quantize="nf4",
            init_lora_weights=False,
        ),
    )
    tiled = TiledGatedMLP(holder.mlp, 2048)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    params = [p for p in tiled.parameters() if p.requires_grad]
    y = tiled(x)
    grads = torch.autograd.grad(y, [x, *params], grad_y)
    ref_y, ref_grads = _reference(tiled, x, grad_y)
    for got, ref in zip((y, *grads), (ref_y, *ref_grads)):
        err = (got.double() - ref).norm() / ref.norm()
        assert err < 2e-2, f"relative error {err:.2e}"
