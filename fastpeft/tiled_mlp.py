"""TiledGatedMLP: ``down(act(gate(x)) · up(x))`` over row tiles, saving only its input ``x``.

A gated MLP (Llama, Mistral, Qwen2, Gemma) with (Q)LoRA projections, hidden H, intermediate F, M
rows. Autograd on the plain module keeps ``gate(x)``, ``up(x)``, ``act(gate(x))`` and their product,
four ``[M, F]`` tensors (F = 3.5·H in Llama-3 8B), and its backward makes as many gradients of that
size: the largest activations of a block by far. Here one autograd Function runs the MLP over tiles
of ``tile_rows`` rows and saves only x; the backward recomputes each tile's ``gate``/``up`` outputs
and runs its backward before the next tile, so no ``[M, F]`` tensor ever exists whole: the extra
memory is a few ``[tile_rows, F]`` tensors. The cost is the recompute of two of the three GEMMs.

The projections go through the fused LoRA op's training path (:mod:`fastpeft.kernels.lora_linear`:
x·Aᵀ reused, one ``addmm_`` for the LoRA term). With several tiles, each NF4 weight is dequantized
once per pass into its own workspace (``nf4_mlp_gate`` / ``_up`` / ``_down``) rather than once per
tile; with one tile the shared ``nf4_dequant`` workspace serves.

Gradients: dX, and dA, dB of each adapter, accumulated over tiles in fp32. The module falls back
to the plain MLP (same outputs, autograd) where the fused path does not apply: adapters with
dropout in training, DoRA or other variants, a trainable base weight or bias, routed rows, or
``tile_rows=None``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastpeft.adapters import LoraAdapter
from fastpeft.kernels.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.kernels.backend import tile_starts
from fastpeft.kernels.lora_linear import lora_linear_training_backward, lora_linear_training_forward
from fastpeft.kernels.nf4 import NF4Weight
from fastpeft.kernels.nf4_dequantize import dequantize_nf4
from fastpeft.kernels.workspace import get_workspace
from fastpeft.lora_linear import AdapterLinear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class _Projection:
    """One frozen projection: W ``[N, K]`` (dense or NF4), bias, LoRA scale (0 without an adapter)."""

    weight: torch.Tensor | NF4Weight
    bias: torch.Tensor | None
    scaling: float
    name: str

    def dense(self, dtype: torch.dtype, own_workspace: bool) -> torch.Tensor:
        """W in ``dtype``: an NF4 W dequantized into this projection's workspace, or into the shared
        one (then valid only until the next dequantization: fetch it right before each use)."""
        if not isinstance(self.weight, NF4Weight):
            return self.weight.to(dtype)
        n, k = self.weight.shape
        name = f"nf4_mlp_{self.name}" if own_workspace else "nf4_dequant"
        return dequantize_nf4(self.weight, dtype, out=get_workspace(name, n * k, dtype, self.weight.device).view(n, k))


class _Weights:
    """Dense W of each projection for one pass: dequantized once (several tiles, own workspaces) or
    at every use (one tile, the shared workspace)."""

    def __init__(self, projections: list[_Projection], dtype: torch.dtype, several_tiles: bool) -> None:
        self.projections, self.dtype, self.several = projections, dtype, several_tiles
        self.cached = [p.dense(dtype, True) for p in projections] if several_tiles else None

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cached[i] if self.cached is not None else self.projections[i].dense(self.dtype, False)


def _forward(
    p: _Projection,
    w: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ, x·Aᵀ); just x·Wᵀ + bias without an adapter."""
    if a is not None:
        return lora_linear_training_forward(x, w, p.bias, a, b, p.scaling, out=out)
    if p.bias is None:
        return torch.mm(x, w.t(), out=out), None
    return torch.addmm(p.bias, x, w.t(), out=out), None


def _backward(
    p: _Projection,
    w: torch.Tensor,
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
) -> tuple[torch.Tensor, Any, Any]:
    """(dX, dA, dB) of :func:`_forward`; dA, dB are None without an adapter."""
    if a is None:
        return torch.mm(grad_y, w), None, None
    return lora_linear_training_backward(grad_y, x, xa, w, a, b, p.scaling)


class TiledGatedMLPFn(torch.autograd.Function):
    """Inputs: x ``[M, H]``, then (A, B) per projection (None for a bare one); see the module docstring."""

    @staticmethod
    def forward(ctx, x, projections, act_fn, tile_rows, *lora):  # type: ignore[override]
        gate, up, down = projections
        (ga, gb), (ua, ub), (da, db) = lora[0:2], lora[2:4], lora[4:6]
        m = x.shape[0]
        w = _Weights(projections, x.dtype, m > tile_rows)
        out = x.new_empty(m, down.weight.shape[0])
        for start in tile_starts(m, tile_rows, x):
            xt = x[start : start + tile_rows]
            h = act_fn(_forward(gate, w[0], xt, ga, gb)[0])
            h.mul_(_forward(up, w[1], xt, ua, ub)[0])  # [t, F]
            _forward(down, w[2], h, da, db, out=out[start : start + tile_rows])
            del h
        ctx.save_for_backward(x, *lora)
        ctx.projections, ctx.act_fn, ctx.tile_rows = projections, act_fn, tile_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, *lora = ctx.saved_tensors
        gate, up, down = ctx.projections
        (ga, gb), (ua, ub), (da, db) = lora[0:2], lora[2:4], lora[4:6]
        m, tile = x.shape[0], ctx.tile_rows
        w = _Weights(ctx.projections, x.dtype, m > tile)
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x)
        sums: list[torch.Tensor | None] = [None] * 6  # fp32 dA, dB per projection, summed over tiles
        for start in tile_starts(m, tile, x):
            xt, gyt = x[start : start + tile], grad_out[start : start + tile]
            g, xa_g = _forward(gate, w[0], xt, ga, gb)
            u, xa_u = _forward(up, w[1], xt, ua, ub)
            with torch.enable_grad():
                g.requires_grad_(True)
                act = ctx.act_fn(g)
            h = act.detach() * u
            dh, *d_down = _backward(down, w[2], gyt, h, None, da, db)
            del h
            du = dh * act.detach()
            (dg,) = torch.autograd.grad(act, g, dh * u)
            del act, g, u, dh
            dxg, *d_gate = _backward(gate, w[0], dg, xt, xa_g, ga, gb)
            dxu, *d_up = _backward(up, w[1], du, xt, xa_u, ua, ub)
            torch.add(dxg, dxu, out=grad_x[start : start + tile])
            del dg, du, dxg, dxu
            for i, d in enumerate((*d_gate, *d_up, *d_down)):
                if d is not None:
                    sums[i] = d.float() if sums[i] is None else sums[i].add_(d)
        grads = [None if s is None else s.to(t.dtype) for s, t in zip(sums, lora)]
        return (grad_x, None, None, None, *grads)


def _fusable(layer: nn.Module) -> bool:
    """True when ``layer`` is a frozen AdapterLinear whose active part the fused path computes exactly."""
    if not isinstance(layer, AdapterLinear) or layer.row_routing is not None or layer.base_needs_grad():
        return False
    if layer.bias is not None and layer.bias.requires_grad:
        return False
    if layer.disabled or layer.merged_adapter is not None or layer.active_adapter not in layer.adapters:
        return True  # the base layer alone
    adapter = layer.adapters[layer.active_adapter]
    return type(adapter) is LoraAdapter and not adapter.dropout_active()


def _projection(name: str, layer: AdapterLinear) -> tuple[_Projection, torch.Tensor | None, torch.Tensor | None]:
    adapted = not layer.disabled and layer.merged_adapter is None and layer.active_adapter in layer.adapters
    adapter = layer.adapters[layer.active_adapter] if adapted else None
    p = _Projection(layer.base_operand(), layer.bias, adapter.scaling if adapter else 0.0, name.removesuffix("_proj"))
    return p, (adapter.lora_A if adapter else None), (adapter.lora_B if adapter else None)


class TiledGatedMLP(nn.Module):
    """Drop-in for a gated MLP module holding ``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``.

    The submodules are the wrapped module's own (same names, so state dicts and adapter files keep
    their keys). ``tile_rows``: rows per tile, or None for the plain MLP.
    """

    def __init__(self, mlp: nn.Module, tile_rows: int | None = 4096) -> None:
        super().__init__()
        if tile_rows is not None and (not isinstance(tile_rows, int) or tile_rows <= 0):
            raise ValueError(f"tile_rows must be a positive int or None, got {tile_rows!r}")
        for name in (*PROJECTIONS, "act_fn"):
            if not hasattr(mlp, name):
                raise TypeError(
                    f"TiledGatedMLP wraps a gated MLP with {PROJECTIONS} and act_fn; "
                    f"{type(mlp).__name__} has no {name!r}"
                )
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = mlp.act_fn
        self.tile_rows = tile_rows
        self.wrapped_class = type(mlp).__name__

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def _tiled_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        # nothing to save: the modules themselves, one tile at a time (a checkpointed block's forward)
        x2d, tile = x.reshape(-1, x.shape[-1]), self.tile_rows
        if x2d.shape[0] <= tile:
            return self.plain_forward(x)
        first = self.plain_forward(x2d[:tile])
        out = first.new_empty(x2d.shape[0], first.shape[-1])
        out[:tile] = first
        for s in tile_starts(x2d.shape[0], tile, x)[1:]:
            out[s : s + tile] = self.plain_forward(x2d[s : s + tile])
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., H] -> [..., H]``."""
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        if self.tile_rows is None:
            return self.plain_forward(x)
        if not torch.is_grad_enabled():
            return self._tiled_no_grad(x)
        if not all(_fusable(m) for m in layers):
            return self.plain_forward(x)
        self.gate_proj._check_input(x)
        self.up_proj._check_input(x)
        parts = [_projection(n, m) for n, m in zip(PROJECTIONS, layers)]
        projections = [p for p, _, _ in parts]
        lora = [t for _, a, b in parts for t in (a, b)]
        x2d = x.reshape(-1, x.shape[-1])
        amp = autocast_dtype(x.device)
        if amp is not None and x.is_floating_point():
            x2d, *lora = cast_for_autocast(amp, x2d, *lora)
            projections = [dataclasses.replace(p, bias=None if p.bias is None else p.bias.to(amp)) for p in projections]
            if not isinstance(projections[0].weight, NF4Weight):
                projections = [dataclasses.replace(p, weight=p.weight.to(amp)) for p in projections]
        with autocast_off(x.device):
            y = TiledGatedMLPFn.apply(x2d.contiguous(), projections, self.act_fn, self.tile_rows, *lora)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"tile_rows={self.tile_rows}, wraps={self.wrapped_class}"


def tile_gated_mlps(model: nn.Module, tile_rows: int | None = 4096) -> int:
    """Replace every gated MLP of ``model`` (a module with gate/up/down projections and ``act_fn``)
    by a :class:`TiledGatedMLP` around its own submodules (set ``tile_rows`` on those already
    replaced); returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, TiledGatedMLP):
            module.tile_rows, count = tile_rows, count + 1
        elif all(hasattr(module, a) for a in (*PROJECTIONS, "act_fn")) and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, TiledGatedMLP(module, tile_rows))
            count += 1
    return count
