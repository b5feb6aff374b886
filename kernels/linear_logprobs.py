"""Per-token log-probs (and entropy) of an LM head without materializing the ``[N, V]`` logits.

    z_i    = h_i · Wᵀ / τ                               (temperature τ)
    lse_i  = logsumexp_v z_iv
    logp_i = z_i[y_i] − lse_i
    ent_i  = lse_i − Σ_v p_iv z_iv                       (p_i = softmax(z_i))

Backward, with ``g = dL/dlogp`` and ``e = dL/dent`` (both ``[N]``)::

    dz_iv = g_i (δ_v,y_i − p_iv) − e_i p_iv (z_iv − Σ_u p_iu z_iu)
    dH = (dz / τ) · W          dW = (dz / τ)ᵀ · H

Shapes: hidden ``[N, H]``, weight ``[V, H]`` (an LM head, nn.Linear layout), targets ``[N]`` int64.

This is the op RL and preference training need: the policy, the reference and the value passes
want log p(token) per completion token, not a summed loss, so the gradient cannot be folded into
the forward as :mod:`fastpeft.kernels.linear_cross_entropy` does (it depends on ``g``, which is
known only in the backward). The forward runs over chunks of ``C`` rows: one GEMM for the chunk's
logits ``[C, V]``, then ONE row kernel reading them once (online max, Σ e^z and Σ e^z·z) and
keeping only ``lse`` and ``ent`` per row. The backward recomputes each chunk's logits (one GEMM),
a second row kernel turns them into ``dz / τ`` in place, and two GEMMs give the chunk's dH rows
and dW contribution. Peak extra memory: one ``[C, V]`` chunk (in the compute dtype: the Triton
row kernels read 16-bit logits and do their math in fp32, so no fp32 copy of the chunk exists)
plus dH ``[N, H]`` and, when the LM head trains, an fp32 dW ``[V, H]``. Saved for the backward:
hidden, targets and two fp32 numbers per row.

On CPU the same loop runs with the torch references of the two row steps (the "chunked" path),
which also run in float64 (tests compare it with the full-logits computation there).

Custom ops: ``fastpeft::linear_logprobs`` (``logp``, ``ent``, ``lse``) and
``fastpeft::linear_logprobs_backward`` (dH, dW), ``torch.library.custom_op`` with ``register_fake``
and ``register_autograd``; opaque to torch.compile like ``fastpeft::linear_cross_entropy``, since
the chunk loop and the vocabulary check run on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from fastpeft.kernels._constants import FLOAT_DTYPES as _COMPUTE_DTYPES
from fastpeft.kernels.autocast import autocast_off
from fastpeft.kernels.backend import use_triton
from fastpeft.kernels.linear_cross_entropy import default_chunk_size, lm_head_inputs
from fastpeft.kernels.workspace import accounting, note_transient

FLOAT_DTYPES = (*_COMPUTE_DTYPES, torch.float64)  # float64: the torch path, for tests against the full logits


@triton.jit
def _logprob_stats_kernel(
    logits_ptr,
    targets_ptr,
    logp_ptr,
    lse_ptr,
    ent_ptr,
    n_cols,
    stride_row,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    """One program per row: log p(target), log-sum-exp and entropy of softmax(logits · inv_temp)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m = float("-inf")
    s = 0.0  # Σ exp(z − m)
    t = 0.0  # Σ exp(z − m) · z
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        rescale = tl.exp(m - m_new)
        w = tl.where(mask, tl.exp(z - m_new), 0.0)
        s = s * rescale + tl.sum(w, axis=0)
        t = t * rescale + tl.sum(w * tl.where(mask, z, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, z_target - lse)
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, lse - t / s)


@triton.jit
def _logprob_grad_kernel(
    logits_ptr,
    targets_ptr,
    lse_ptr,
    mean_z_ptr,
    grad_logp_ptr,
    grad_ent_ptr,
    n_cols,
    stride_row,
    inv_temp,
    HAS_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: ``dz / τ`` (module docstring) written over the row's logits, in their dtype."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_logp_ptr + row)
    if HAS_ENT:
        e = tl.load(grad_ent_ptr + row)
        mean_z = tl.load(mean_z_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(z - lse)
        dz = g * (tl.where(cols == target, 1.0, 0.0) - p)
        if HAS_ENT:
            dz -= e * p * (z - mean_z)
        tl.store(row_ptr + cols, (dz * inv_temp).to(logits_ptr.dtype.element_ty), mask=mask)


def _check_rows(logits: torch.Tensor, *rows: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(
            f"logits must be 2-D [C, V] with unit column stride, got shape {tuple(logits.shape)} "
            f"strides {logits.stride()}"
        )
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float64/float32/float16/bfloat16, got {logits.dtype}")
    for t in rows:
        if t.shape != (logits.shape[0],) or t.device != logits.device or not t.is_contiguous():
            raise ValueError(
                f"per-row tensors must be contiguous [{logits.shape[0]}] on {logits.device}, got "
                f"{tuple(t.shape)} strides {t.stride()} on {t.device}"
            )


def _block_v(n_cols: int, block_v: int | None) -> int:
    block_v = block_v or min(triton.next_power_of_2(n_cols), 8192)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    return block_v


def logprob_stats_triton(
    logits: torch.Tensor, targets: torch.Tensor, inv_temp: float = 1.0, block_v: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row statistics of ``logits [C, V]`` (read only): fp32 ``(logp [C], lse [C], ent [C])``.
    ``block_v`` (a power of two) overrides the vocabulary tile, e.g. to run the multi-tile loop on small V."""
    _check_rows(logits, targets)
    n_rows, n_cols = logits.shape
    out = [torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(3)]
    block_v = _block_v(n_cols, block_v)
    if n_rows == 0 or is_fake(logits):  # FakeTensors (memory accounting): outputs allocated, no launch
        return out[0], out[1], out[2]
    num_warps = 4 if block_v <= 2048 else 8  # bandwidth-bound row kernels: a cheap heuristic, no autotune
    _logprob_stats_kernel[(n_rows,)](
        logits, targets, *out, n_cols, logits.stride(0), float(inv_temp), BLOCK_V=block_v, num_warps=num_warps
    )
    return out[0], out[1], out[2]


def logprob_stats_reference(
    logits: torch.Tensor, targets: torch.Tensor, inv_temp: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`logprob_stats_triton` (fp32 math, float64 for float64 logits)."""
    _check_rows(logits, targets)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) * inv_temp
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, lse, ent


def logprob_grad_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    mean_z: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_ent: torch.Tensor | None,
    inv_temp: float = 1.0,
    block_v: int | None = None,
) -> torch.Tensor:
    """Overwrite ``logits [C, V]`` with ``dz / τ`` (module docstring) and return it. ``lse``,
    ``mean_z`` (= lse − ent), ``grad_logp``, ``grad_ent``: fp32 ``[C]``; the entropy term is
    skipped when ``grad_ent`` is None."""
    has_ent = grad_ent is not None
    _check_rows(logits, targets, lse, grad_logp, *((mean_z, grad_ent) if has_ent else ()))
    n_rows, n_cols = logits.shape
    block_v = _block_v(n_cols, block_v)
    if n_rows == 0 or is_fake(logits):
        return logits
    num_warps = 4 if block_v <= 2048 else 8
    _logprob_grad_kernel[(n_rows,)](
        logits,
        targets,
        lse,
        mean_z if has_ent else lse,
        grad_logp,
        grad_ent if has_ent else grad_logp,
        n_cols,
        logits.stride(0),
        float(inv_temp),
        HAS_ENT=has_ent,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logits


def logprob_grad_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    mean_z: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_ent: torch.Tensor | None,
    inv_temp: float = 1.0,
) -> torch.Tensor:
    """Torch reference of :func:`logprob_grad_triton` (same in-place contract)."""
    has_ent = grad_ent is not None
    _check_rows(logits, targets, lse, grad_logp, *((mean_z, grad_ent) if has_ent else ()))
    acc = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(acc) * inv_temp
    p = torch.exp(z - lse.to(acc)[:, None])
    dz = -grad_logp.to(acc)[:, None] * p
    dz.scatter_add_(1, targets[:, None], grad_logp.to(acc)[:, None])
    if has_ent:
        dz -= grad_ent.to(acc)[:, None] * p * (z - mean_z.to(acc)[:, None])
    return logits.copy_(dz * inv_temp)


def _stats(logits: torch.Tensor, targets: torch.Tensor, inv_temp: float) -> tuple[torch.Tensor, ...]:
    if use_triton(logits) and logits.dtype != torch.float64:
        return logprob_stats_triton(logits, targets, inv_temp)
    return logprob_stats_reference(logits, targets, inv_temp)


def _grad(logits: torch.Tensor, *args: torch.Tensor | float | None) -> torch.Tensor:
    if use_triton(logits) and logits.dtype != torch.float64:
        return logprob_grad_triton(logits, *args)  # type: ignore[arg-type]
    return logprob_grad_reference(logits, *args)  # type: ignore[arg-type]


def linear_logprobs_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth that materializes the logits (differentiable by plain autograd): ``(logp, ent)``,
    each shaped like ``targets``, in hidden's dtype promoted to at least fp32."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(1, targets.reshape(-1, 1)).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp.reshape(targets.shape), ent.reshape(targets.shape)


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> int:
    return chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.shape[1])


def _transient_bytes(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    chunk_size: int,
    backward: bool = False,
    want_h: bool = False,
    want_w: bool = False,
) -> int:
    """Bytes the real op holds at once on top of its outputs, as on a GPU (the Triton row kernels: no
    fp32 copy of a chunk): the logits chunk ``[C, V]`` in hidden's dtype; in the backward also the
    chunk's dH rows ``[C, H]`` and, for a 16-bit head that trains, the fp32 dW accumulator ``[V, H]``
    plus one chunk's 16-bit dW term."""
    (n, h), v = hidden.shape, weight.shape[0]
    c, size = min(n, _chunk(hidden, weight, chunk_size)), hidden.element_size()
    total = c * v * size
    if backward and want_h:
        total += c * h * size
    if backward and want_w and weight.dtype != torch.float32:
        total += v * h * (4 + weight.element_size())
    return total


@torch.library.custom_op("fastpeft::linear_logprobs", mutates_args=())
def _linear_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, ent, lse)`` ``[N]`` (fp32; float64 for float64 inputs) of hidden ``[N, H]``, weight
    ``[V, H]``, targets int64 ``[N]``, one ``[C, V]`` chunk of logits at a time (``chunk_size`` 0:
    :func:`~fastpeft.kernels.linear_cross_entropy.default_chunk_size`)."""
    n, v = hidden.shape[0], weight.shape[0]
    if n and bool(((targets < 0) | (targets >= v)).any()):
        raise ValueError(f"target {int(targets[(targets < 0) | (targets >= v)][0])} is outside the vocabulary [0, {v})")
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logp, ent, lse = (torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3))
    chunk = _chunk(hidden, weight, chunk_size)
    with autocast_off(hidden.device):
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logp[rows], lse[rows], ent[rows] = _stats(hidden[rows] @ weight.t(), targets[rows], inv_temp)
    return logp, ent, lse


@_linear_logprobs_op.register_fake
def _(hidden, weight, targets, inv_temp, chunk_size):  # type: ignore[no-untyped-def]
    """Outputs as the real op allocates them. No workspace; per chunk of C rows it holds transient
    logits ``[C, V]`` in hidden's dtype (the torch path adds fp32 temporaries of that size), reported
    to the memory ledger (:func:`_transient_bytes`)."""
    if accounting():
        note_transient(_transient_bytes(hidden, weight, chunk_size))
    acc = torch.promote_types(hidden.dtype, torch.float32)
    return tuple(hidden.new_empty(hidden.shape[0], dtype=acc) for _ in range(3))


@torch.library.custom_op("fastpeft::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_ent: torch.Tensor | None,
    inv_temp: float,
    chunk_size: int,
    want_h: bool,
    want_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dH [N, H], dW [V, H])`` (``[0]`` where not wanted) from the upstream gradients of logp and
    ent (None: that output did not reach the loss), recomputing each chunk's logits."""
    acc = lse.dtype
    # autograd may hand over expanded (stride-0) gradients; the row kernels index rows directly
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(acc).contiguous()
    mean_z = lse - ent if grad_ent is not None else None
    grad_ent = grad_ent.to(acc).contiguous() if grad_ent is not None else None
    grad_h = torch.empty_like(hidden) if want_h else hidden.new_empty(0)
    # dW sums over every chunk: fp32 keeps a 16-bit head's gradient from rounding at each add
    dw_dtype = torch.promote_types(weight.dtype, torch.float32)
    grad_w = torch.zeros_like(weight, dtype=dw_dtype) if want_w else None
    chunk = _chunk(hidden, weight, chunk_size)
    with autocast_off(hidden.device):
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h_c = hidden[rows]
            dz = _grad(
                h_c @ weight.t(),
                targets[rows],
                lse[rows],
                mean_z[rows] if mean_z is not None else None,
                grad_logp[rows],
                grad_ent[rows] if grad_ent is not None else None,
                inv_temp,
            )
            dz = dz.to(hidden.dtype)
            if want_h:
                grad_h[rows] = dz @ weight
            if want_w and grad_w.dtype == dz.dtype:
                grad_w.addmm_(dz.t(), h_c)
            elif want_w:  # a 16-bit GEMM (fp32 accumulation inside), summed over chunks in fp32
                grad_w += dz.t() @ h_c
    return grad_h, grad_w.to(weight.dtype) if want_w else hidden.new_empty(0)


@_linear_logprobs_backward_op.register_fake
def _(hidden, weight, targets, lse, ent, grad_logp, grad_ent, inv_temp, chunk_size, want_h, want_w):  # type: ignore[no-untyped-def]
    """Outputs as the real op allocates them; its chunk temporaries and (for a 16-bit head) fp32 dW
    accumulator go to the memory ledger as transients (:func:`_transient_bytes`)."""
    if accounting():
        note_transient(_transient_bytes(hidden, weight, chunk_size, True, want_h, want_w))
    return (
        torch.empty_like(hidden) if want_h else hidden.new_empty(0),
        torch.empty_like(weight) if want_w else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    hidden, weight, targets, inv_temp, chunk_size = inputs
    _, ent, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, targets, lse, ent)
    ctx.inv_temp, ctx.chunk_size = inv_temp, chunk_size
    ctx.set_materialize_grads(False)  # an output that never reaches the loss arrives as None: no work


def _backward(ctx, grad_logp, grad_ent, _grad_lse):  # type: ignore[no-untyped-def]
    hidden, weight, targets, lse, ent = ctx.saved_tensors
    want_h, want_w = ctx.needs_input_grad[:2]
    if not (want_h or want_w) or (grad_logp is None and grad_ent is None):
        return None, None, None, None, None
    dh, dw = torch.ops.fastpeft.linear_logprobs_backward(
        hidden, weight, targets, lse, ent, grad_logp, grad_ent, ctx.inv_temp, ctx.chunk_size, want_h, want_w
    )
    return dh if want_h else None, dw if want_w else None, None, None, None


_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, ent)`` of ``softmax(hidden [*, H] @ weight [V, H]ᵀ / temperature)`` at ``targets [*]``,
    chunked (module docstring); both shaped like ``targets``, fp32 (float64 for float64 inputs).

    Both outputs are differentiable; an output that does not reach the loss costs nothing in the
    backward. Under autocast, hidden and weight are cast to the autocast dtype first (differentiably,
    so fp32 master weights get fp32 gradients). Every target must be a vocabulary id: select the
    rows that matter before calling (e.g. the completion tokens).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden, weight = lm_head_inputs(hidden, weight, targets, "targets", chunk_size, FLOAT_DTYPES)
    shape, flat = targets.shape, targets.reshape(-1).long()
    logp, ent, _ = torch.ops.fastpeft.linear_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), weight, flat, 1.0 / temperature, chunk_size or 0
    )
    return logp.reshape(shape), ent.reshape(shape)
