"""y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with a frozen base W (dense or NF4) and LoRA factors A, B.

Shapes (PEFT's): x ``[M, K]``, W ``[N, K]`` (dense tensor or :class:`NF4Weight`), b ``[N]`` or
None, A ``[r, K]``, B ``[N, r]``, s a Python float (alpha/r, or alpha/sqrt(r) for rsLoRA).

Backward (W frozen, so no dW):
    dX = dY·W + s·(dY·B)·A      dA = s·(dY·B)ᵀ·x      dB = s·dYᵀ·(x·Aᵀ)      db = Σ_rows dY

This file holds the torch reference and the autograd Function; the Triton launchers are chosen
through :func:`fastpeft.kernels.backend.backend`.
"""

from __future__ import annotations

import torch

from fastpeft.kernels.nf4 import NF4Weight, dequantize_nf4

Weight = torch.Tensor | NF4Weight


def _dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, NF4Weight):
        return dequantize_nf4(weight, dtype)
    return weight.to(dtype)


def check_lora_linear_args(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None,
                           lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:  # fmt: skip
    """Raise a ValueError/TypeError naming the offending shape, dtype or device."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features but the weight {tuple(weight.shape)} expects {k}")
    r = lora_A.shape[0]
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be [r, {k}], got {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must be [{n}, {r}], got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    tensors = {"lora_A": lora_A, "lora_B": lora_B, "bias": bias}
    if isinstance(weight, torch.Tensor):
        tensors["weight"] = weight
    else:
        tensors["weight.packed"] = weight.packed
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")
    for name in ("lora_A", "lora_B"):
        if tensors[name].dtype != x.dtype:
            raise TypeError(f"x is {x.dtype} but {name} is {tensors[name].dtype}")


def lora_linear_reference(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
    """Torch reference of the forward; differentiable through plain autograd. Returns ``[M, N]``."""
    w = _dense(weight, x.dtype)
    y = x @ w.t() + scaling * ((x @ lora_A.t()) @ lora_B.t())
    return y if bias is None else y + bias.to(x.dtype)


def lora_linear_backward_reference(grad_y: torch.Tensor, x: torch.Tensor, weight: Weight,
                                   lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dX ``[M, K]``, dA ``[r, K]``, dB ``[N, r]``) by the formulas in the module docstring."""
    w = _dense(weight, grad_y.dtype)
    g_b = grad_y @ lora_B  # [M, r]
    grad_x = grad_y @ w + scaling * (g_b @ lora_A)
    grad_a = scaling * (g_b.t() @ x)
    grad_b = scaling * (grad_y.t() @ (x @ lora_A.t()))
    return grad_x, grad_a, grad_b


class LoRALinearFn(torch.autograd.Function):
    """Autograd wrapper: saves only x (and the frozen weight by reference), never a dense copy of W."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):  # type: ignore[override]
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.weight, ctx.scaling, ctx.has_bias = weight, scaling, bias is not None
        with torch.no_grad():
            return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, lora_A, lora_B = ctx.saved_tensors
        grad_x, grad_a, grad_b = lora_linear_backward_reference(
            grad_y.contiguous(), x, ctx.weight, lora_A, lora_B, ctx.scaling
        )
        grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
    """Fused (Q)LoRA linear, ``x [M, K] -> y [M, N]``; differentiable in x, A, B (and b)."""
    check_lora_linear_args(x, weight, bias, lora_A, lora_B)
    return LoRALinearFn.apply(x, weight, bias, lora_A, lora_B, scaling)
