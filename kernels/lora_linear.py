"""y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with a frozen base W (dense or NF4) and LoRA factors A, B.

Shapes (PEFT's): x ``[M, K]``, W ``[N, K]`` (dense tensor or :class:`NF4Weight`), b ``[N]`` or
None, A ``[r, K]``, B ``[N, r]``, s a Python float (alpha/r, or alpha/sqrt(r) for rsLoRA).

Backward (W frozen, so no dW):
    dX = dY·W + s·(dY·B)·A      dA = s·(dY·B)ᵀ·x      dB = s·dYᵀ·(x·Aᵀ)      db = Σ_rows dY

Two regimes:

- decode, M <= 16, on the "triton" backend (:func:`fastpeft.kernels.backend.backend`):
  :func:`fastpeft.kernels.nf4_lora_decode.nf4_lora_decode`, one Triton kernel that streams the
  4-bit weight once (memory-bound; see that file).
- training (every other call, and every backward, on both backends): compute-bound, so the BLAS
  (cuBLAS, or the CPU's) does the GEMMs. An NF4 weight is dequantized (by the Triton kernel, or the
  torch reference on the "torch" backend) into ONE reused workspace
  (:mod:`fastpeft.kernels.workspace`, shared by all layers of that dtype), then ``addmm`` with the
  bias, then the LoRA term accumulated into the same output by a second ``addmm_`` (beta=1,
  alpha=s): no [M, N] temporary, no separate scale pass. x·Aᵀ is kept from the forward for dB;
  the backward dequantizes again into the workspace rather than keeping a dense copy alive.

:func:`lora_linear_reference` / :func:`lora_linear_backward_reference` are the plain-torch ground
truth for tests.

Custom ops: ``fastpeft::lora_linear`` (dense W) and ``fastpeft::nf4_lora_linear`` (NF4 W), the
forward (y and the kept x·Aᵀ), and ``fastpeft::lora_linear_backward`` (dX, dA, dB), all
``torch.library.triton_op`` (Triton launches through ``wrap_triton``) with ``register_fake``; the
forward ops carry the backward with ``register_autograd``. The backend choice is made inside
them, so torch.compile traces :func:`lora_linear` without graph breaks.
"""

from __future__ import annotations

import torch

from fastpeft.kernels.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.kernels.backend import tracing, use_triton
from fastpeft.kernels.lora_linear_inputs import (
    Weight,
    WeightArgs,
    check_lora_linear_args,
    check_scaling,
    weight_from_op_args,
    weight_op_args,
)
from fastpeft.kernels.nf4 import NF4Weight
from fastpeft.kernels.nf4_cpu import gemv_applicable, nf4_linear_cpu
from fastpeft.kernels.nf4_dequantize import dequantize_into, dequantize_nf4
from fastpeft.kernels.nf4_lora_decode import DECODE_MAX_ROWS, launch_nf4_lora_decode
from fastpeft.kernels.workspace import accounting, get_workspace

__all__ = [
    "DECODE_MAX_ROWS",
    "LoRALinearFn",
    "check_lora_linear_args",
    "dense_weight",
    "lora_linear",
    "lora_linear_backward_reference",
    "lora_linear_reference",
    "lora_linear_training_backward",
    "lora_linear_training_forward",
]


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
    return dequantize_into(weight, buf)


# ----------------------------------------------------------------------------------------------
# torch reference (ground truth for tests)


def lora_linear_reference(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Torch reference of the forward; differentiable through plain autograd. Returns ``[M, N]``."""
    w = _dense(weight, x.dtype)
    y = x @ w.t() + scaling * ((x @ lora_A.t()) @ lora_B.t())
    return y if bias is None else y + bias.to(x.dtype)


def lora_linear_backward_reference(
    grad_y: torch.Tensor, x: torch.Tensor, weight: Weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX ``[M, K]``, dA ``[r, K]``, dB ``[N, r]``) by the formulas in the module docstring."""
    w = _dense(weight, grad_y.dtype)
    g_b = grad_y @ lora_B  # [M, r]
    grad_x = grad_y @ w + scaling * (g_b @ lora_A)
    grad_a = scaling * (g_b.t() @ x)
    grad_b = scaling * (grad_y.t() @ (x @ lora_A.t()))
    return grad_x, grad_a, grad_b


# ----------------------------------------------------------------------------------------------
# training regime (both backends): dequant into the workspace + BLAS


def lora_linear_training_forward(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward for large M: returns (y ``[M, N]``, x·Aᵀ ``[M, r]``, kept for the backward).

    ``out`` (``[M, N]``, x's dtype, contiguous) receives y when given.
    """
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling)
    return _training_forward(x, weight, bias, lora_A, lora_B, check_scaling(scaling), out)


def _training_forward(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = x.shape[0], lora_B.shape[0]
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(
            f"out must be {x.dtype} [{m}, {n}] on {x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    y = base_linear(x, weight, bias, out)
    xa = torch.mm(x, lora_A.t())  # [M, r]
    y.addmm_(xa, lora_B.t(), alpha=scaling)  # one GEMM with beta=1: no [M, N] temporary
    return y, xa


def base_linear(
    x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x·Wᵀ + b ``[M, N]`` as the training path computes it (into ``out`` when given): bitsandbytes'
    fused GEMV for CPU decode rows of an NF4 W, else W dense (the workspace for NF4) and one GEMM."""
    if isinstance(weight, NF4Weight) and gemv_applicable(x, weight):
        y = nf4_linear_cpu(x, weight, bias)
        return y if out is None else out.copy_(y)
    w = dense_weight(weight, x.dtype)
    return torch.mm(x, w.t(), out=out) if bias is None else torch.addmm(bias, x, w.t(), out=out)


def lora_linear_training_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor | None,
    weight: Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
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
    if need_a:  # beta=0: the uninitialized input is never read
        grad_a = torch.addmm(lora_A.new_empty(lora_A.shape), g_b.t(), x, beta=0, alpha=scaling)
    if need_b:
        xa = torch.mm(x, lora_A.t()) if xa is None else xa
        grad_b = torch.addmm(lora_B.new_empty(lora_B.shape), grad_y.t(), xa, beta=0, alpha=scaling)
    return grad_x, grad_a, grad_b


# ----------------------------------------------------------------------------------------------
# custom ops and autograd


def _no_rows(t: torch.Tensor, r: int) -> torch.Tensor:
    """The ``[0, r]`` placeholder for an x·Aᵀ that is not kept (ops return tensors, never None)."""
    return t.new_empty((0, r))


def _forward(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    save_xa: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of the forward ops: (y ``[M, N]``, x·Aᵀ ``[M, r]`` if ``save_xa`` else ``[0, r]``)."""
    r = lora_A.shape[0]
    with autocast_off(x.device):
        if use_triton(x) and x.shape[0] <= DECODE_MAX_ROWS:
            y = launch_nf4_lora_decode(x, weight, bias, lora_A, lora_B, scaling)
            return y, (torch.mm(x, lora_A.t()) if save_xa else _no_rows(x, r))
        y, xa = _training_forward(x, weight, bias, lora_A, lora_B, scaling)
        return y, (xa if save_xa else _no_rows(x, r))


def _forward_fake(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, save_xa: bool, nf4: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """y ``[M, N]`` and x·Aᵀ ``[M or 0, r]``, contiguous, as the real ops allocate them.

    Workspaces the real ops use (held across calls): an NF4 W is dequantized into ``"nf4_dequant"``
    (``[N, K]`` in x's dtype; one buffer, sized for the largest layer, shared by all layers) on the
    training path; the decode path (Triton, M <= 16) sums split-K partials in ``"lora_decode_acc"``
    (fp32 ``[16, N]``) and ``"lora_decode_count"`` (int32, one per 32-column tile). They are made
    here only for the memory ledger (:func:`fastpeft.kernels.workspace.accounting`).
    """
    n, r = lora_B.shape
    account_forward_workspaces(x, n, nf4)
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0] if save_xa else 0, r))


def account_forward_workspaces(x: torch.Tensor, n: int, nf4: bool) -> None:
    """Inside a forward op's fake implementation: make the workspaces the real op uses for x
    ``[M, K]`` and N output columns, for the memory ledger only (:func:`~fastpeft.kernels.workspace.accounting`)."""
    if not accounting():
        return
    m, k = x.shape
    if m > DECODE_MAX_ROWS and nf4:
        get_workspace("nf4_dequant", n * k, x.dtype, x.device)
    elif m <= DECODE_MAX_ROWS:
        get_workspace("lora_decode_acc", DECODE_MAX_ROWS * n, torch.float32, x.device, zeroed=True)
        get_workspace("lora_decode_count", -(-n // 32), torch.int32, x.device, zeroed=True)


# Two forward ops, not one with optional NF4 arguments: a differentiable torch.library op pays per
# call for every argument of its schema (~70 µs per eager call at 12 arguments vs 7 on a CPU core).
@torch.library.triton_op("fastpeft::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    save_xa: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense W ``[N, K]``: (y ``[M, N]``, x·Aᵀ ``[M, r]`` if ``save_xa`` else ``[0, r]``)."""
    return _forward(x, weight, bias, lora_A, lora_B, scaling, save_xa)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, save_xa):  # type: ignore[no-untyped-def]
    return _forward_fake(x, lora_A, lora_B, save_xa)


@torch.library.triton_op("fastpeft::nf4_lora_linear", mutates_args=())
def _nf4_lora_linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    save_xa: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 W (:meth:`NF4Weight.op_args` and its blocksize): as ``fastpeft::lora_linear``."""
    w = NF4Weight.from_op_args(
        packed, absmax, nested_absmax, nested_code, offset, (lora_B.shape[0], x.shape[1]), blocksize, x.dtype
    )
    return _forward(x, w, bias, lora_A, lora_B, scaling, save_xa)


@_nf4_lora_linear_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, bias, lora_A, lora_B, scaling, save_xa):  # type: ignore[no-untyped-def]
    return _forward_fake(x, lora_A, lora_B, save_xa, nf4=True)


@torch.library.triton_op("fastpeft::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX ``[M, K]``, dA ``[r, K]``, dB ``[N, r]``), each an empty ``[0]`` tensor where not needed.
    ``xa`` is the forward's x·Aᵀ (``[0, r]``: not kept, recomputed for dB)."""
    m, k = x.shape
    w = weight_from_op_args(
        weight, absmax, nested_absmax, nested_code, offset, blocksize, (lora_B.shape[0], k), grad_y.dtype
    )
    with autocast_off(x.device):
        grads = lora_linear_training_backward(
            grad_y, x, xa if xa.shape[0] == m else None, w, lora_A, lora_B, scaling, (need_x, need_a, need_b)
        )
    return tuple(g if g is not None else x.new_empty(0) for g in grads)  # type: ignore[return-value]


@_lora_linear_backward_op.register_fake
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
    lora_A,
    lora_B,
    scaling,
    need_x,
    need_a,
    need_b,
):  # type: ignore[no-untyped-def]
    """The gradients as the real op allocates them; it dequantizes an NF4 W into the same
    ``"nf4_dequant"`` workspace as the forward (made here for the memory ledger only), and
    allocates a transient dY·B ``[M, r]``."""
    if accounting() and absmax is not None:
        get_workspace("nf4_dequant", lora_B.shape[0] * x.shape[1], grad_y.dtype, x.device)
    return (
        grad_y.new_empty(x.shape) if need_x else x.new_empty(0),
        grad_y.new_empty(lora_A.shape) if need_a else x.new_empty(0),
        grad_y.new_empty(lora_B.shape) if need_b else x.new_empty(0),
    )


def _save(ctx, weight_args: WeightArgs, x, bias, lora_A, lora_B, scaling, xa) -> None:  # type: ignore[no-untyped-def]
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, xa, *weight_args[:5], lora_A, lora_B)
    ctx.blocksize, ctx.scaling, ctx.has_bias = weight_args[5], scaling, bias is not None


def _grads(ctx, grad_y, need_x: bool, need_bias: bool, need_a: bool, need_b: bool):  # type: ignore[no-untyped-def]
    """(dX, db, dA, dB), None where not needed, through ``fastpeft::lora_linear_backward``."""
    x, xa, weight, absmax, nested_absmax, nested_code, offset, lora_A, lora_B = ctx.saved_tensors
    grad_x, grad_a, grad_b = torch.ops.fastpeft.lora_linear_backward(
        grad_y,
        x,
        xa,
        weight,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        ctx.blocksize,
        lora_A,
        lora_B,
        ctx.scaling,
        need_x,
        need_a,
        need_b,
    )
    grad_bias = grad_y.sum(0) if ctx.has_bias and need_bias else None
    return grad_x if need_x else None, grad_bias, grad_a if need_a else None, grad_b if need_b else None


def _setup_dense(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, bias, lora_A, lora_B, scaling, _ = inputs
    _save(ctx, weight_op_args(weight), x, bias, lora_A, lora_B, scaling, output[1])


def _backward_dense(ctx, grad_y, _grad_xa):  # type: ignore[no-untyped-def]
    need = ctx.needs_input_grad
    grad_x, grad_bias, grad_a, grad_b = _grads(ctx, grad_y, need[0], need[2], need[3], need[4])
    return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _setup_nf4(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, bias, lora_A, lora_B, scaling, _ = inputs
    _save(
        ctx,
        (packed, absmax, nested_absmax, nested_code, offset, blocksize),
        x,
        bias,
        lora_A,
        lora_B,
        scaling,
        output[1],
    )


def _backward_nf4(ctx, grad_y, _grad_xa):  # type: ignore[no-untyped-def]
    need = ctx.needs_input_grad
    grad_x, grad_bias, grad_a, grad_b = _grads(ctx, grad_y, need[0], need[7], need[8], need[9])
    return grad_x, None, None, None, None, None, None, grad_bias, grad_a, grad_b, None, None


_lora_linear_op.register_autograd(_backward_dense, setup_context=_setup_dense)
_nf4_lora_linear_op.register_autograd(_backward_nf4, setup_context=_setup_nf4)


class LoRALinearFn(torch.autograd.Function):
    """The ops' forward and backward bodies behind a plain autograd Function, for eager calls.

    A differentiable ``torch.library`` op pays the dispatcher on every eager call (measured on one
    CPU core, 128 x 64 -> 64, r 8: 227 µs per forward + backward through the op, 111 µs through this
    Function, 98 µs for PEFT's unfused layer), as much as a small layer's GEMMs. Traces (torch.compile,
    FakeTensorMode, any dispatch mode such as the memory ledger's tracker) and the profiler still see
    the ops.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, save_xa):  # type: ignore[no-untyped-def]
        y, xa = _forward(x, weight, bias, lora_A, lora_B, scaling, save_xa)
        nf4 = isinstance(weight, NF4Weight)
        ctx.save_for_backward(x, xa if save_xa else None, lora_A, lora_B, None if nf4 else weight)
        ctx.nf4_weight = weight if nf4 else None  # the module's frozen buffers: nothing new is kept
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[no-untyped-def]
        x, xa, lora_A, lora_B, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        w = ctx.nf4_weight if weight is None else weight
        with autocast_off(x.device):
            grad_x, grad_a, grad_b = lora_linear_training_backward(
                grad_y, x, xa, w, lora_A, lora_B, ctx.scaling, (need[0], need[3], need[4])
            )
        grad_bias = grad_y.sum(0) if ctx.has_bias and need[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _dispatcher_needed(x: torch.Tensor) -> bool:
    """True where the ops are wanted: Dynamo compiling, fake tensors, any dispatch mode active, or
    the profiler on (so a profile names ``fastpeft::`` ops, at the dispatcher's cost)."""
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._autograd._profiler_enabled()
        or tracing(x)
    )


def lora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Fused (Q)LoRA linear, ``x [M, K] -> y [M, N]``; differentiable in x, A, B (and b).

    Inside ``torch.autocast`` it computes in the autocast dtype, like ``nn.Linear``: x, b, A, B and
    a dense W are cast to it (an NF4 W is dequantized straight into it). Traced, it is the op
    ``fastpeft::lora_linear`` (dense W) or ``fastpeft::nf4_lora_linear``; eager, the same bodies
    through :class:`LoRALinearFn`.
    """
    if isinstance(x, torch.Tensor) and x.is_floating_point() and (amp := autocast_dtype(x.device)) is not None:
        x, weight, bias, lora_A, lora_B = cast_for_autocast(amp, x, weight, bias, lora_A, lora_B)  # NF4 W: as is
    check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling)
    save_xa = torch.is_grad_enabled() and lora_B.requires_grad  # dB = s·dYᵀ·(x·Aᵀ)
    scaling = check_scaling(scaling)
    if not _dispatcher_needed(x):
        return LoRALinearFn.apply(x, weight, bias, lora_A, lora_B, scaling, save_xa)
    if isinstance(weight, NF4Weight):
        y, _ = torch.ops.fastpeft.nf4_lora_linear(
            x, *weight.op_args(), weight.blocksize, bias, lora_A, lora_B, scaling, save_xa
        )
    else:
        y, _ = torch.ops.fastpeft.lora_linear(x, weight, bias, lora_A, lora_B, scaling, save_xa)
    return y
