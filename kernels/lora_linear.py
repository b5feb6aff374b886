"""y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with a frozen base W (dense or NF4) and LoRA factors A, B.

Shapes (PEFT's): x ``[M, K]``, W ``[N, K]`` (dense tensor or :class:`NF4Weight`), b ``[N]`` or
None, A ``[r, K]``, B ``[N, r]``, s a Python float (alpha/r, or alpha/sqrt(r) for rsLoRA).

Backward (W frozen, so no dW):
    dX = dY·W + s·(dY·B)·A      dA = s·(dY·B)ᵀ·x      dB = s·dYᵀ·(x·Aᵀ)      db = Σ_rows dY

Two regimes on the "triton" backend (chosen by :func:`fastpeft.kernels.backend.backend`):

- decode, M <= 16: :func:`fastpeft.kernels.nf4_lora_decode.nf4_lora_decode`, one Triton kernel
  that streams the 4-bit weight once (memory-bound; see that file).
- training, M > 16 (and every backward): compute-bound, so cuBLAS does the GEMMs. An NF4 weight is
  dequantized by the Triton kernel into ONE reused workspace (:mod:`fastpeft.kernels.workspace`,
  shared by all layers of that dtype), then ``addmm`` with the bias, then the LoRA term
  accumulated into the same output by a second ``addmm_`` (beta=1, alpha=s): no [M, N] temporary.
  The backward dequantizes again into the workspace rather than keeping a dense copy alive.

The "torch" backend runs :func:`lora_linear_reference` / :func:`lora_linear_backward_reference`.
"""

from __future__ import annotations

import torch

from fastpeft.kernels.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.kernels.backend import backend
from fastpeft.kernels.lora_linear_args import Weight, check_lora_linear_args, check_scaling
from fastpeft.kernels.nf4 import NF4Weight, dequantize_nf4
from fastpeft.kernels.nf4_cpu import gemv_applicable, nf4_linear_cpu
from fastpeft.kernels.nf4_lora_decode import DECODE_MAX_ROWS, launch_nf4_lora_decode
from fastpeft.kernels.workspace import get_workspace

__all__ = [
    "DECODE_MAX_ROWS", "LoRALinearFn", "check_lora_linear_args", "dense_weight", "lora_linear",
    "lora_linear_backward_reference", "lora_linear_reference", "lora_linear_training_backward",
    "lora_linear_training_forward",
]  # fmt: skip


def _dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, NF4Weight):
        return dequantize_nf4(weight, dtype)
    return weight.to(dtype)


def dense_weight(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """W ``[N, K]`` in ``dtype`` for a GEMM: a dense W as is, an NF4 W dequantized into the shared
    workspace. The result is only valid until the next call for a layer of the same dtype."""
    if not isinstance(weight, NF4Weight):
        return weight
    n, k = weight.shape
    buf = get_workspace("nf4_dequant", n * k, dtype, weight.device).view(n, k)
    return dequantize_nf4(weight, dtype, out=buf)


# ----------------------------------------------------------------------------------------------
# torch reference (ground truth for tests, the CPU path)


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


# ----------------------------------------------------------------------------------------------
# training regime: Triton dequant into the workspace + cuBLAS


def lora_linear_training_forward(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None,
                                 lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
                                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Forward for large M: returns (y ``[M, N]``, x·Aᵀ ``[M, r]``, kept for the backward).

    ``out`` (``[M, N]``, x's dtype, contiguous) receives y when given.
    """
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling)
    return _training_forward(x, weight, bias, lora_A, lora_B, check_scaling(scaling), out)


def _training_forward(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scaling: float, out: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    m, n = x.shape[0], lora_B.shape[0]
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must be {x.dtype} [{m}, {n}] on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")  # fmt: skip
    if isinstance(weight, NF4Weight) and gemv_applicable(x, weight):  # CPU decode: bnb's fused GEMV
        y = nf4_linear_cpu(x, weight, bias)
        y = y if out is None else out.copy_(y)
    else:
        w = dense_weight(weight, x.dtype)
        y = torch.mm(x, w.t(), out=out) if bias is None else torch.addmm(bias, x, w.t(), out=out)
    xa = torch.mm(x, lora_A.t())  # [M, r]
    y.addmm_(xa, lora_B.t(), alpha=scaling)  # one GEMM with beta=1: no [M, N] temporary
    return y, xa


def lora_linear_training_backward(grad_y: torch.Tensor, x: torch.Tensor, xa: torch.Tensor | None, weight: Weight,
                                  lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                                  needs: tuple[bool, bool, bool] = (True, True, True),
                                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(dX ``[M, K]``, dA ``[r, K]``, dB ``[N, r]``), each None where ``needs`` says so.

    ``xa`` is x·Aᵀ ``[M, r]`` from the forward (recomputed when None). dX reuses the dequant
    workspace: dX = dY·W, then s·(dY·B)·A accumulated into it by ``addmm_``.
    """
    scaling = check_scaling(scaling)
    need_x, need_a, need_b = needs
    grad_x = grad_a = grad_b = None
    g_b = torch.mm(grad_y, lora_B) if (need_x or need_a) else None  # [M, r]
    if need_x:
        grad_x = torch.mm(grad_y, dense_weight(weight, grad_y.dtype))
        grad_x.addmm_(g_b, lora_A, alpha=scaling)
    if need_a:
        grad_a = torch.mm(g_b.t(), x).mul_(scaling)
    if need_b:
        xa = torch.mm(x, lora_A.t()) if xa is None else xa
        grad_b = torch.mm(grad_y.t(), xa).mul_(scaling)
    return grad_x, grad_a, grad_b


# ----------------------------------------------------------------------------------------------
# autograd


class LoRALinearFn(torch.autograd.Function):
    """Autograd wrapper: saves x (and x·Aᵀ on the training path), never a dense copy of W."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):  # type: ignore[override]
        kernels = backend(x) == "triton"
        # NF4 on the CPU: dequantize into the workspace (or bnb's GEMV) + addmm, never the reference's dense copy
        use_triton = kernels or (isinstance(weight, NF4Weight) and x.device.type == "cpu")
        xa = None
        if not use_triton:
            y = lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling)
        elif kernels and x.shape[0] <= DECODE_MAX_ROWS:
            y = launch_nf4_lora_decode(x, weight, bias, lora_A, lora_B, scaling)
        else:
            y, xa = _training_forward(x, weight, bias, lora_A, lora_B, scaling)
        ctx.save_for_backward(x, lora_A, lora_B, xa)
        ctx.weight, ctx.scaling, ctx.has_bias, ctx.use_triton = weight, scaling, bias is not None, use_triton
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        with autocast_off(grad_y.device):  # backward may run inside the caller's autocast block
            x, lora_A, lora_B, xa = ctx.saved_tensors
            need_x, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
            if ctx.use_triton:
                grad_x, grad_a, grad_b = lora_linear_training_backward(
                    grad_y, x, xa, ctx.weight, lora_A, lora_B, ctx.scaling, (need_x, need_a, need_b)
                )
            else:
                grad_x, grad_a, grad_b = lora_linear_backward_reference(
                    grad_y.contiguous(), x, ctx.weight, lora_A, lora_B, ctx.scaling
                )
            grad_bias = grad_y.sum(0) if ctx.has_bias and need_bias else None
            return grad_x, None, grad_bias, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
    """Fused (Q)LoRA linear, ``x [M, K] -> y [M, N]``; differentiable in x, A, B (and b).

    Inside ``torch.autocast`` it computes in the autocast dtype, like ``nn.Linear``: x, b, A, B and
    a dense W are cast to it (an NF4 W is dequantized straight into it).
    """
    if isinstance(x, torch.Tensor) and x.is_floating_point() and (amp := autocast_dtype(x.device)) is not None:
        x, weight, bias, lora_A, lora_B = cast_for_autocast(amp, x, weight, bias, lora_A, lora_B)  # NF4 W: as is
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling)
    with autocast_off(x.device):
        return LoRALinearFn.apply(x, weight, bias, lora_A, lora_B, check_scaling(scaling))
