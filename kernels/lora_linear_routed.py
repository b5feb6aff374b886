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

Custom ops, like :mod:`fastpeft.kernels.lora_linear`'s: ``fastpeft::lora_linear_routed`` (the forward:
y and the kept masked x·Aᵀ of every adapter, concatenated along r) with ``register_autograd``, and
``fastpeft::lora_linear_routed_backward`` (dX and each adapter's dA, dB), both ``triton_op`` with
``register_fake``; the weight travels as :func:`~fastpeft.kernels.lora_linear_inputs.weight_op_args`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastpeft.kernels.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.kernels.backend import tracing, use_triton
from fastpeft.kernels.lora_linear import account_forward_workspaces, base_linear, dense_weight
from fastpeft.kernels.lora_linear_inputs import (
    Weight,
    check_lora_linear_args,
    check_scaling,
    weight_from_op_args,
    weight_op_args,
)
from fastpeft.kernels.nf4_lora_decode import DECODE_MAX_ROWS, launch_nf4_lora_decode
from fastpeft.kernels.workspace import accounting, get_workspace


def _regime(x: torch.Tensor) -> str:
    """Which arithmetic the single-adapter op uses here (kept in step with ``lora_linear._forward``)."""
    return "decode" if use_triton(x) and x.shape[0] <= DECODE_MAX_ROWS else "training"


def _row_masks(row_adapters: torch.Tensor, n_adapters: int) -> list[torch.Tensor]:
    return [(row_adapters == a)[:, None] for a in range(n_adapters)]


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


def _masked_xas(x: torch.Tensor, lora_A: Sequence[torch.Tensor], row_adapters: torch.Tensor) -> list[torch.Tensor]:
    """x·A_aᵀ ``[M, r_a]`` per adapter with other adapters' rows zeroed (zeros add exactly)."""
    masks = _row_masks(row_adapters, len(lora_A))
    return [torch.mm(x, a_.t()).masked_fill_(~mask, 0.0) for a_, mask in zip(lora_A, masks)]


def _unstacked(xa: torch.Tensor, lora_A: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each adapter's columns of a ``[M, Σ r_a]`` concatenation (views)."""
    return list(xa.split([a.shape[0] for a in lora_A], dim=1))


@torch.library.triton_op("fastpeft::lora_linear_routed", mutates_args=())
def _routed_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    bias: torch.Tensor | None,
    row_adapters: torch.Tensor,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scalings: list[float],
    save_xa: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y ``[M, N]``, every adapter's x·Aᵀ with other adapters' rows zeroed, ``[M, Σ r_a]``, or
    ``[0, Σ r_a]`` when not ``save_xa``: the backward recomputes it)."""
    n = lora_B[0].shape[0]
    w = weight_from_op_args(weight, absmax, nested_absmax, nested_code, offset, blocksize, (n, x.shape[1]), x.dtype)
    total_r = sum(a.shape[0] for a in lora_A)
    with autocast_off(x.device):
        if _regime(x) == "decode":
            rank = max(a.shape[0] for a in lora_A)
            scales = torch.tensor(scalings, dtype=torch.float32, device=x.device)
            y = launch_nf4_lora_decode(
                x,
                w,
                bias,
                _stacked(lora_A, 0, rank),
                _stacked(lora_B, 1, rank),
                0.0,
                row_adapters=row_adapters.to(torch.int32).contiguous(),
                adapter_scales=scales,
            )
            xas = _masked_xas(x, lora_A, row_adapters) if save_xa else []
        else:
            y = base_linear(x, w, bias)
            xas = _masked_xas(x, lora_A, row_adapters)
            for xa, b_, s in zip(xas, lora_B, scalings):
                y.addmm_(xa, b_.t(), alpha=s)
        return y, (torch.cat(xas, dim=1) if save_xa else x.new_empty((0, total_r)))


@_routed_op.register_fake
def _(
    x,
    weight,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    bias,
    row_adapters,
    lora_A,
    lora_B,
    scalings,
    save_xa,
):  # type: ignore[no-untyped-def]
    """As the real op allocates them, with the workspaces of ``fastpeft::lora_linear``'s path."""
    m, n = x.shape[0], lora_B[0].shape[0]
    account_forward_workspaces(x, n, nf4=absmax is not None)
    return x.new_empty((m, n)), x.new_empty((m if save_xa else 0, sum(a.shape[0] for a in lora_A)))


@torch.library.triton_op("fastpeft::lora_linear_routed_backward", mutates_args=())
def _routed_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    row_adapters: torch.Tensor,
    lora_A: list[torch.Tensor],
    lora_B: list[torch.Tensor],
    scalings: list[float],
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(dX ``[M, K]``, dA_a ``[r_a, K]`` per adapter, dB_a ``[N, r_a]`` per adapter), empty ``[0]``
    tensors where not needed; ``xa`` the forward's (``[0, Σ r_a]``: recomputed)."""
    m, k = x.shape
    w = weight_from_op_args(
        weight, absmax, nested_absmax, nested_code, offset, blocksize, (lora_B[0].shape[0], k), grad_y.dtype
    )
    kept = xa.shape[0] == m
    xas = _unstacked(xa, lora_A) if kept else _masked_xas(x, lora_A, row_adapters) if need_b else [None] * len(lora_A)
    with autocast_off(x.device):
        grad_x = torch.mm(grad_y, dense_weight(w, grad_y.dtype)) if need_x else x.new_empty(0)
        grads_a, grads_b = [], []
        for a_, b_, s, mask, xa_ in zip(lora_A, lora_B, scalings, _row_masks(row_adapters, len(lora_A)), xas):
            g = torch.mm(grad_y, b_).masked_fill_(~mask, 0.0)  # [M, r]
            if need_x:
                grad_x.addmm_(g, a_, alpha=s)
            grads_a.append(torch.mm(g.t(), x).mul_(s) if need_a else x.new_empty(0))
            grads_b.append(torch.mm(grad_y.t(), xa_).mul_(s) if need_b else x.new_empty(0))
    return grad_x, grads_a, grads_b


@_routed_backward_op.register_fake
def _(
    grad_y,
    x,
    xa,
    weight,
    absmax,
    nested_absmax,
    nested_code,
    offset,
    blocksize,
    row_adapters,
    lora_A,
    lora_B,
    scalings,
    need_x,
    need_a,
    need_b,
):  # type: ignore[no-untyped-def]
    """As the real op allocates them; an NF4 W is dequantized into the ``"nf4_dequant"`` workspace."""
    if accounting() and absmax is not None and need_x:
        get_workspace("nf4_dequant", lora_B[0].shape[0] * x.shape[1], grad_y.dtype, x.device)
    return (
        grad_y.new_empty(x.shape) if need_x else x.new_empty(0),
        [grad_y.new_empty(a.shape) if need_a else x.new_empty(0) for a in lora_A],
        [grad_y.new_empty(b.shape) if need_b else x.new_empty(0) for b in lora_B],
    )


def _setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    (
        x,
        weight,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        blocksize,
        bias,
        row_adapters,
        lora_A,
        lora_B,
        scalings,
        _,
    ) = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(
        x, output[1], weight, absmax, nested_absmax, nested_code, offset, row_adapters, *lora_A, *lora_B
    )
    ctx.blocksize, ctx.scalings, ctx.has_bias, ctx.n_adapters = blocksize, scalings, bias is not None, len(lora_A)


def _backward(ctx, grad_y, _grad_xa):  # type: ignore[no-untyped-def]
    x, xa, weight, absmax, nested_absmax, nested_code, offset, row_adapters, *factors = ctx.saved_tensors
    n = ctx.n_adapters
    lora_A, lora_B = factors[:n], factors[n:]
    need = ctx.needs_input_grad
    need_x, need_bias = need[0], need[7]
    need_a, need_b = any(a.requires_grad for a in lora_A), any(b.requires_grad for b in lora_B)
    grad_x, grads_a, grads_b = torch.ops.fastpeft.lora_linear_routed_backward(
        grad_y.contiguous(),
        x,
        xa,
        weight,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        ctx.blocksize,
        row_adapters,
        lora_A,
        lora_B,
        ctx.scalings,
        need_x,
        need_a,
        need_b,
    )
    grad_bias = grad_y.sum(0) if ctx.has_bias and need_bias else None
    return (
        grad_x if need_x else None,
        None,
        None,
        None,
        None,
        None,
        None,
        grad_bias,
        None,
        grads_a if need_a else None,
        grads_b if need_b else None,
        None,
        None,
    )


_routed_op.register_autograd(_backward, setup_context=_setup)


def lora_linear_routed(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    row_adapters: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    scalings: Sequence[float],
) -> torch.Tensor:
    """``x [M, K] -> y [M, N]`` with row i through adapter ``row_adapters[i]`` (-1: the base only).

    ``lora_A[a]`` ``[r_a, K]``, ``lora_B[a]`` ``[N, r_a]``, ``scalings[a]`` a float, for each adapter
    a; differentiable in x, every A and B, and b. Autocast is followed as in ``lora_linear``. Runs
    the op ``fastpeft::lora_linear_routed``.
    """
    n_adapters = len(lora_A)
    if n_adapters == 0 or len(lora_B) != n_adapters or len(scalings) != n_adapters:
        raise ValueError(
            f"need one lora_A, lora_B and scaling per adapter, got {len(lora_A)}, {len(lora_B)}, {len(scalings)}"
        )
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
        raise ValueError(
            f"row_adapters must be [{x.shape[0]}] on {x.device}, got {tuple(row_adapters.shape)} on "
            f"{row_adapters.device}"
        )
    # values are checked where that costs no device sync (callers on CUDA pass ids they built), and
    # not on traced ids, whose values are unknown
    if (
        row_adapters.device.type == "cpu"
        and row_adapters.numel()
        and not torch.compiler.is_compiling()
        and not tracing(row_adapters)
    ):
        low, high = int(row_adapters.min()), int(row_adapters.max())
        if low < -1 or high >= n_adapters:
            raise ValueError(
                f"row_adapters must be in [-1, {n_adapters}) for {n_adapters} adapters, got values from {low} to {high}"
            )
    save_xa = torch.is_grad_enabled() and any(b.requires_grad for b in lora_B)  # dB_a = s_a·dYᵀ·xa_a
    y, _ = torch.ops.fastpeft.lora_linear_routed(
        x, *weight_op_args(weight), bias, row_adapters, list(lora_A), list(lora_B), scalings, save_xa
    )
    return y
