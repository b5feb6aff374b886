"""LeanRMSNorm: Llama's RMSNorm with a backward that keeps only x and one fp32 scalar per row.

    y = w · (x·rstd).to(x.dtype),   rstd = 1 / sqrt(mean(x², -1) + eps)   (fp32 inside, as Llama's)
    dx = rstd · (g − n · mean(g·n, -1)),   g = (dy·w) in fp32,  n = x·rstd      dw = Σ_rows dy · n

transformers' Llama RMSNorm (also Mistral's, Qwen2's, ...) saves its fp32 copy of x, the fp32
normalized x and the rounded product for autograd: 10 bytes per element of a bf16 ``[T, H]``, and
its backward makes several fp32 ``[T, H]`` gradients. Here autograd keeps x (usually the residual
stream, alive anyway) and rstd ``[T]``; forward and backward run over row chunks, so fp32
temporaries stay ``[chunk_rows, H]``. Outputs match the transformers module bit for bit (the same
fp32 operations per row); gradients agree to fp32 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpeft.kernels.backend import tile_starts

CHUNK_ROWS = 2048


class LeanRMSNormFn(torch.autograd.Function):
    """x ``[M, H]``, w ``[H]`` -> y ``[M, H]`` in ``promote(w.dtype, x.dtype)``; saves x, w and rstd ``[M]``."""

    @staticmethod
    def forward(ctx, x, weight, eps, chunk_rows):  # type: ignore[override]
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for s in tile_starts(x.shape[0], chunk_rows, x):
            xf = x[s : s + chunk_rows].float()
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            rstd[s : s + chunk_rows] = r.squeeze(-1)
            torch.mul(weight, (xf * r).to(x.dtype), out=y[s : s + chunk_rows])
        ctx.save_for_backward(x, weight, rstd)
        ctx.chunk_rows = chunk_rows
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in tile_starts(x.shape[0], ctx.chunk_rows, x):
            r = rstd[s : s + ctx.chunk_rows, None]
            n = x[s : s + ctx.chunk_rows].float() * r  # [c, H] fp32
            dy = grad_y[s : s + ctx.chunk_rows]
            if need_w:
                grad_w += (dy * n.to(x.dtype)).float().sum(0)
            if need_x:
                g = (dy * weight).float()
                dot = (g * n).mean(-1, keepdim=True)
                grad_x[s : s + ctx.chunk_rows] = (r * (g - n * dot)).to(x.dtype)
        return grad_x, grad_w.to(weight.dtype) if need_w else None, None, None


def lean_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Llama RMSNorm of ``x [..., H]`` with weight ``[H]`` (see the module docstring)."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit: expected [..., H] and [H]")
    y = LeanRMSNormFn.apply(x.reshape(-1, x.shape[-1]), weight, float(eps), chunk_rows)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class LeanRMSNorm(nn.Module):
    """Drop-in for a Llama-style RMSNorm module (``weight``, ``variance_epsilon``), sharing its weight."""

    def __init__(self, norm: nn.Module, chunk_rows: int = CHUNK_ROWS) -> None:
        super().__init__()
        if not is_llama_rms_norm(norm):
            raise TypeError(
                f"LeanRMSNorm replaces a Llama-style RMSNorm (weight and variance_epsilon), got {type(norm).__name__}"
            )
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self.chunk_rows = chunk_rows
        self.wrapped_class = type(norm).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lean_rms_norm(x, self.weight, self.variance_epsilon, self.chunk_rows)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, wraps={self.wrapped_class}"


def is_llama_rms_norm(module: nn.Module) -> bool:
    """True for the transformers RMSNorm classes that compute ``w · (x·rstd).to(dtype)`` (Llama's
    formula, which Mistral, Qwen2, Qwen3, Phi-3 and others copy); Gemma's ``(1 + w)`` form is not."""
    name = type(module).__name__
    return (
        name.endswith("RMSNorm")
        and not name.startswith("Gemma")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def lean_rms_norms(model: nn.Module, chunk_rows: int = CHUNK_ROWS) -> int:
    """Replace every Llama-style RMSNorm of ``model`` by a :class:`LeanRMSNorm`; returns how many."""
    swaps = [(name, m) for name, m in model.named_modules() if name and is_llama_rms_norm(m)]
    for name, module in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, LeanRMSNorm(module, chunk_rows))
    return len(swaps)
