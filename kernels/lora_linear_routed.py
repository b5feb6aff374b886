"""Several LoRA adapters in one batch: row i of x goes through adapter ``row_adapters[i]`` (-1: none).

    y = x·Wᵀ + b + Σ_a [row in a] · s_a·(x·A_aᵀ)·B_aᵀ

x ``[M, K]``, W ``[N, K]`` (dense or :class:`NF4Weight`, frozen), b ``[N]`` or None, adapter a has
A_a ``[r_a, K]``, B_a ``[N, r_a]`` and scale s_a; ``row_adapters`` int ``[M]`` in ``[-1, n_adapters)``.

The base weight is read once for the whole batch, whatever the mix of adapters:

- decode (M <= 16 on the Triton backend): the fused decode kernel
  (:mod:`fastpeft.kernels.nf4_lora_decode`) with the adapters stacked along r (each padded to the
  largest rank) and the row ids, SGMV/BGMV style: one stream of W, each row's x·Aᵀ columns of
  other adapters zeroed before the up-projection;
- otherwise: the base product once, then for each adapter the same two GEMMs the single-adapter op
  (:func:`fastpeft.kernels.lora_linear.lora_linear`) runs, on the whole batch, with the rows of
  other adapters zeroed in x·Aᵀ. Zeros add exactly, so each row is bit for bit what the
  single-adapter op computes on the same batch (tests/kernels/test_lora_linear_routed.py).

Backward (W frozen), with ``g_a = (dY·B_a)`` restricted to a's rows and ``xa_a`` likewise:
    dX = dY·W + Σ_a s_a·g_a·A_a      dA_a = s_a·g_aᵀ·x      dB_a = s_a·dYᵀ·xa_a      db = Σ_rows dY
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastpeft.kernels.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.kernels.backend import use_triton
from fastpeft.kernels.lora_linear import dense_weight
from fastpeft.kernels.lora_linear_inputs import Weight, check_lora_linear_args, check_scaling
from fastpeft.kernels.nf4 import NF4Weight
from fastpeft.kernels.nf4_cpu import gemv_applicable, nf4_linear_cpu
from fastpeft.kernels.nf4_lora_decode import DECODE_MAX_ROWS, launch_nf4_lora_decode


def _regime(x: torch.Tensor) -> str:
    """Which arithmetic the single-adapter op uses here (kept in step with ``lora_linear._forward``)."""
    return "decode" if use_triton(x) and x.shape[0] <= DECODE_MAX_ROWS else "training"


def _row_masks(row_adapters: torch.Tensor, n_adapters: int) -> list[torch.Tensor]:
    return [(row_adapters == a)[:, None] for a in range(n_adapters)]


def _base(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + b as the single-adapter op's training path computes it."""
    if isinstance(weight, NF4Weight) and gemv_applicable(x, weight):
        return nf4_linear_cpu(x, weight, bias)
    w = dense_weight(weight, x.dtype)
    return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())


def _stacked(tensors: Sequence[torch.Tensor], dim: int, rank: int) -> torch.Tensor:
    """Adapters' A (dim 0) or B (dim 1) concatenated along r, each zero-padded to ``rank``."""
    padded = []
    for t in tensors:
        pad = rank - t.shape[dim]
        if pad:
            shape = list(t.shape)
            shape[dim] = pad
            t = torch.cat([t, t.new_zeros(shape)], dim=dim)
        padded.append(t)
    return torch.cat(padded, dim=dim).contiguous()


class RoutedLoRALinearFn(torch.autograd.Function):
    """Autograd for :func:`lora_linear_routed`; saves x and each adapter's masked x·Aᵀ (``[M, r_a]``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, row_adapters, scalings, n_adapters, *factors):  # type: ignore[override]
        lora_A, lora_B = factors[:n_adapters], factors[n_adapters:]
        regime = _regime(x)
        masks = _row_masks(row_adapters, n_adapters)
        xas: list[torch.Tensor] = []
        if regime == "decode":
            rank = max(a.shape[0] for a in lora_A)
            ids = row_adapters.to(torch.int32).contiguous()
            scales = torch.tensor(scalings, dtype=torch.float32, device=x.device)
            y = launch_nf4_lora_decode(x, weight, bias, _stacked(lora_A, 0, rank), _stacked(lora_B, 1, rank), 0.0,
                                       row_adapters=ids, adapter_scales=scales)  # fmt: skip
        else:
            y = _base(x, weight, bias)
            for a_, b_, s, mask in zip(lora_A, lora_B, scalings, masks):
                xa = torch.mm(x, a_.t()).masked_fill_(~mask, 0.0)  # [M, r]: other adapters' rows add zeros
                y.addmm_(xa, b_.t(), alpha=s)
                xas.append(xa)
        ctx.save_for_backward(x, row_adapters, *lora_A, *lora_B, *xas)
        ctx.weight, ctx.scalings, ctx.n_adapters, ctx.has_bias = weight, scalings, n_adapters, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        with autocast_off(grad_y.device):
            saved = ctx.saved_tensors
            n = ctx.n_adapters
            x, row_adapters = saved[:2]
            lora_A, lora_B, xas = saved[2 : 2 + n], saved[2 + n : 2 + 2 * n], saved[2 + 2 * n :]
            needs = ctx.needs_input_grad
            grad_y = grad_y.contiguous()
            masks = _row_masks(row_adapters, n)
            weight = ctx.weight
            grad_x = torch.mm(grad_y, dense_weight(weight, grad_y.dtype)) if needs[0] else None
            grads_a, grads_b = [], []
            for i, (a_, b_, s, mask) in enumerate(zip(lora_A, lora_B, ctx.scalings, masks)):
                g = torch.mm(grad_y, b_).masked_fill_(~mask, 0.0)  # [M, r]
                if grad_x is not None:
                    grad_x.addmm_(g, a_, alpha=s)
                grads_a.append(torch.mm(g.t(), x).mul_(s) if needs[6 + i] else None)
                if needs[6 + n + i]:
                    xa = xas[i] if xas else torch.mm(x, a_.t()).masked_fill_(~mask, 0.0)
                    grads_b.append(torch.mm(grad_y.t(), xa).mul_(s))
                else:
                    grads_b.append(None)
            grad_bias = grad_y.sum(0) if ctx.has_bias and needs[2] else None
            return (grad_x, None, grad_bias, None, None, None, *grads_a, *grads_b)


def lora_linear_routed(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, row_adapters: torch.Tensor,
                       lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
                       scalings: Sequence[float]) -> torch.Tensor:  # fmt: skip
    """``x [M, K] -> y [M, N]`` with row i through adapter ``row_adapters[i]`` (-1: the base only).

    ``lora_A[a]`` ``[r_a, K]``, ``lora_B[a]`` ``[N, r_a]``, ``scalings[a]`` a float, for each adapter
    a; differentiable in x, every A and B, and b. Autocast is followed as in ``lora_linear``.
    """
    n_adapters = len(lora_A)
    if n_adapters == 0 or len(lora_B) != n_adapters or len(scalings) != n_adapters:
        raise ValueError(f"need one lora_A, lora_B and scaling per adapter, got {len(lora_A)}, {len(lora_B)}, "
                         f"{len(scalings)}")  # fmt: skip
    if not isinstance(row_adapters, torch.Tensor) or row_adapters.dtype not in (torch.int32, torch.int64):
        got = getattr(row_adapters, "dtype", type(row_adapters).__name__)
        raise TypeError(f"row_adapters must be an int32/int64 tensor, got {got}")
    if isinstance(x, torch.Tensor) and x.is_floating_point() and (amp := autocast_dtype(x.device)) is not None:
        x, weight, bias, *factors = cast_for_autocast(amp, x, weight, bias, *lora_A, *lora_B)
        lora_A, lora_B = factors[:n_adapters], factors[n_adapters:]
    scalings = [check_scaling(s) for s in scalings]
    for a_, b_ in zip(lora_A, lora_B):
        check_lora_linear_args(x, weight, bias, a_, b_)
    if row_adapters.shape != (x.shape[0],) or row_adapters.device != x.device:
        raise ValueError(f"row_adapters must be [{x.shape[0]}] on {x.device}, got {tuple(row_adapters.shape)} on "
                         f"{row_adapters.device}")  # fmt: skip
    # values are checked where that costs no device sync (callers on CUDA pass ids they built)
    if row_adapters.device.type == "cpu" and row_adapters.numel():
        low, high = int(row_adapters.min()), int(row_adapters.max())
        if low < -1 or high >= n_adapters:
            raise ValueError(f"row_adapters must be in [-1, {n_adapters}) for {n_adapters} adapters, got values "
                             f"from {low} to {high}")  # fmt: skip
    with autocast_off(x.device):
        return RoutedLoRALinearFn.apply(x, weight, bias, row_adapters, scalings, n_adapters, *lora_A, *lora_B)

