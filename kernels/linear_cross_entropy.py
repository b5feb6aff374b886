"""Linear + cross-entropy without materializing the full ``[N, V]`` logits.

    loss_i = logsumexp_v(h_i · W_v) − h_i · W_{y_i}        (rows with y_i == ignore_index give 0)
    dL/dlogits_i = softmax(logits_i) − onehot(y_i)
    dH = dlogits · W        dW = dlogitsᵀ · H

Shapes: hidden ``[N, H]``, weight ``[V, H]`` (an LM head, PEFT/nn.Linear layout), labels ``[N]``.

The rows are processed in chunks of ``C`` (only rows whose label is not ignored, so prompt tokens
under completion-only loss cost nothing). For each chunk the logits ``[C, V]`` come from one
GEMM (cuBLAS on GPU), then ONE Triton row kernel reads them twice — online max/sum for the
log-sum-exp, then ``softmax − onehot`` written over the logits in place — and two more GEMMs turn
that into the chunk's dH rows and its dW contribution. Gradients are therefore accumulated during
the forward (no recomputation in backward); the backward only scales them by the incoming
gradient. Peak extra memory: one ``[C, V]`` fp32 chunk plus dW ``[V, H]`` and dH ``[N, H]``.
Without grad mode only the loss is computed.

On CPU the same loop runs with the torch reference of the row kernel (the "chunked" path).

Custom op: ``fastpeft::linear_cross_entropy`` (loss, dH, dW of the summed loss, and the reduction
scale), a ``torch.library.custom_op`` with ``register_fake`` and ``register_autograd``. It is opaque
to torch.compile rather than a traced ``triton_op`` because its work is data-dependent: the rows
that count are found with ``nonzero`` and the chunk loop runs over their number (labels are also
range-checked there, a host sync). The row kernel inside launches directly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastpeft.kernels._constants import FLOAT_DTYPES
from fastpeft.kernels.autocast import autocast_dtype, autocast_off, cast_for_autocast
from fastpeft.kernels.backend import use_triton
from fastpeft.kernels.workspace import accounting, note_transient


@triton.jit
def _cross_entropy_grad_kernel(
    logits_ptr,
    labels_ptr,
    loss_ptr,
    lse_ptr,
    n_cols,
    stride_row,
    ignore_index,
    grad_scale,
    BLOCK_V: tl.constexpr,
):
    """One program per row: loss and log-sum-exp out, (softmax − onehot)·grad_scale over the logits."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    # pass 1: online max and rescaled sum of exponentials, fp32
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe_label = tl.where(ignored, 0, label).to(tl.int64)
    target = tl.load(row_ptr + safe_label).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - target))
    tl.store(lse_ptr + row, lse)
    # pass 2: the gradient of this row's loss with respect to its logits, in place
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == safe_label, 1.0, 0.0)) * grad_scale
        g = tl.where(ignored, 0.0, g)
        tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _check_chunk_args(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(
            f"logits must be 2-D [C, V] with unit column stride, got shape {tuple(logits.shape)} "
            f"strides {logits.stride()}"
        )
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32/float16/bfloat16, got {logits.dtype}")
    if labels.shape != (logits.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{logits.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but labels on {labels.device}")


def _outputs(logits: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows = logits.shape[0]
    if out is None:
        return tuple(torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(2))  # type: ignore[return-value]
    for t in out:
        if t.shape != (n_rows,) or t.dtype != torch.float32 or t.device != logits.device:
            raise ValueError(
                f"out tensors must be float32 [{n_rows}] on {logits.device}, got {t.dtype} "
                f"{tuple(t.shape)} on {t.device}"
            )
    return out


def cross_entropy_grad_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_v: int | None = None,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the row kernel on ``logits [C, V]`` (overwritten with grad_scale·dloss/dlogits); returns
    fp32 ``(loss [C], lse [C])``, written into ``out`` when given. ``block_v`` (a power of two)
    overrides the vocabulary tile, e.g. to exercise the multi-tile loop on small V."""
    _check_chunk_args(logits, labels)
    n_rows, n_cols = logits.shape
    loss, lse = _outputs(logits, out)
    if n_rows == 0:
        return loss, lse
    block_v = block_v or min(triton.next_power_of_2(n_cols), 8192)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    num_warps = 4 if block_v <= 2048 else 8  # row kernels are bandwidth bound: a cheap heuristic, no autotune
    _cross_entropy_grad_kernel[(n_rows,)](
        logits,
        labels,
        loss,
        lse,
        n_cols,
        logits.stride(0),
        ignore_index,
        float(grad_scale),
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return loss, lse


def cross_entropy_grad_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`cross_entropy_grad_triton` (same in-place contract, fp32 math)."""
    if not grad_scale > 0:
        raise ValueError(f"grad_scale must be positive, got {grad_scale}")
    _check_chunk_args(logits, labels)
    loss_out, lse_out = _outputs(logits, out)
    x = logits.float()  # fp32 logits: x is logits, and the gradient is written in place (no [C, V] temporary)
    lse = torch.logsumexp(x, dim=-1)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    loss = torch.where(ignored, 0.0, lse - x.gather(1, safe[:, None]).squeeze(1))
    x.sub_(lse[:, None] - math.log(grad_scale)).exp_()  # grad_scale·softmax, in the same pass
    x.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -grad_scale))
    x.masked_fill_(ignored[:, None], 0.0)
    if x.data_ptr() != logits.data_ptr():
        logits.copy_(x)
    return loss_out.copy_(loss), lse_out.copy_(lse)


def cross_entropy_grad(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, grad_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch the row step (Triton on CUDA / interpreter, torch reference otherwise)."""
    if use_triton(logits):
        return cross_entropy_grad_triton(logits, labels, ignore_index, grad_scale=grad_scale)
    return cross_entropy_grad_reference(logits, labels, ignore_index, grad_scale=grad_scale)


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Ground truth that materializes the logits (differentiable by plain autograd)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)


# The fp32 logits of one chunk, [C, V], may take this many bytes. Sized so that short sequences are
# one chunk (the LM head read once forward, once for dH/dW: as cheap as materialising the logits)
# and long ones stay bounded: 8B Llama (V = 128256) gets 512 rows a chunk, 16 chunks at 8192 tokens.
CHUNK_BYTES = 256 * 2**20


def default_chunk_size(n_rows: int, vocab: int, hidden: int | None = None, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk: as many as fit ``budget_bytes`` of fp32 logits ``[C, V]`` (a multiple of 16
    once there are 16), spread evenly over the fewest chunks that hold ``n_rows``.

    A fixed chunk count (the old rule, V/H chunks) re-read the LM head ~2·V/H times per step even
    for a 127-token batch whose logits are a few MB. ``hidden`` is accepted for callers of that rule.
    """
    cap = max(1, budget_bytes // (4 * max(vocab, 1)))
    if cap >= 16:
        cap -= cap % 16
    n_rows = max(n_rows, 1)
    n_chunks = -(-n_rows // cap)
    rows = -(-n_rows // n_chunks)
    return min(cap, -(-rows // 16) * 16) if rows >= 16 else rows


def _chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    want_h: bool,
    want_w: bool,
    mean: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
    """(summed loss fp32 ``[]``, dH ``[N, H]`` and dW ``[V, H]`` of the reduced loss (None where not
    wanted), the reduction scale). ``chunk_size`` 0: :func:`default_chunk_size`. The scale goes into
    the row step's gradient, so nothing rescales dW afterwards; with no ignored label the chunks are
    slices (no gathers, dH written in place) and dW comes from the first chunk's GEMM."""
    v = weight.shape[0]
    rows = (labels != ignore_index).nonzero().squeeze(1)  # only these rows can contribute
    count = rows.numel()
    every_row = count == labels.numel()
    scale = 1.0 / max(count, 1) if mean else 1.0
    grad_h = (torch.empty_like(hidden) if every_row else torch.zeros_like(hidden)) if want_h else None
    # fp32 weights accumulate dW in fp32; half weights accumulate through addmm in their dtype
    grad_w = torch.zeros_like(weight) if want_w and count == 0 else None
    chunk = chunk_size or default_chunk_size(count, v, hidden.shape[1])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, count, chunk):
        idx = rows[start : start + chunk]
        h_c = hidden[start : start + chunk] if every_row else hidden.index_select(0, idx)  # [C, H]
        logits = h_c @ weight.t()  # [C, V]
        if logits.dtype != torch.float32:
            logits = logits.float()  # the softmax and its gradient want fp32
        labels_c = labels[start : start + chunk] if every_row else labels.index_select(0, idx)
        loss_c, _ = cross_entropy_grad(logits, labels_c, ignore_index, grad_scale=scale)
        total += loss_c.sum()
        if want_h or want_w:
            g = logits.to(hidden.dtype)  # [C, V] = scale·(softmax − onehot)
            if want_h and every_row:
                torch.mm(g, weight, out=grad_h[start : start + chunk])
            elif want_h:
                grad_h.index_copy_(0, idx, g @ weight)
            if want_w:
                grad_w = torch.mm(g.t(), h_c) if grad_w is None else grad_w.addmm_(g.t(), h_c)
    return total, grad_h, grad_w, scale


def _chunk_bytes(hidden: torch.Tensor, weight: torch.Tensor, rows: int, chunk_size: int, with_grads: bool) -> int:
    """Bytes one chunk of :func:`_chunked_loss_and_grads` holds at once on top of the op's outputs."""
    v, h = weight.shape
    c = min(rows, chunk_size or default_chunk_size(rows, v, h))
    size = hidden.element_size()
    logits = c * v * 4 + (c * v * size if with_grads and hidden.dtype != torch.float32 else 0)
    return logits + c * h * size * (2 if with_grads else 1)


@torch.library.custom_op("fastpeft::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    mean: bool,
    chunk_size: int,
    want_h: bool,
    want_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss fp32 ``[]`` (mean over counted rows, 0 without any, or the sum), dH and dW of that loss
    (``[0]`` where not wanted), the reduction scale fp32 ``[]``). hidden ``[N, H]``, weight ``[V, H]``,
    labels int64 ``[N]``."""
    v = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        raise ValueError(
            f"label {int(labels[bad][0])} is outside the vocabulary [0, {v}) and is not ignore_index={ignore_index}"
        )
    with autocast_off(hidden.device):
        total, grad_h, grad_w, scale = _chunked_loss_and_grads(
            hidden, weight, labels, ignore_index, chunk_size, want_h, want_w, mean
        )
    scale = total.new_full((), scale)
    grad_h = grad_h if want_h else hidden.new_empty(0)
    grad_w = grad_w if want_w else hidden.new_empty(0)
    return total * scale, grad_h, grad_w, scale


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, ignore_index, mean, chunk_size, want_h, want_w):  # type: ignore[no-untyped-def]
    """Outputs as the real op allocates them (dH, dW filled chunk by chunk).
    No workspace; per chunk of C counted rows it holds transient logits fp32 ``[C, V]`` (plus a copy
    in hidden's dtype for 16-bit inputs), the chunk of hidden ``[C, H]`` and its dH rows ``[C, H]``:
    reported to the memory ledger with every row counted (a fake tensor has no labels to skip)."""
    if accounting():
        note_transient(_chunk_bytes(hidden, weight, labels.numel(), chunk_size, want_h or want_w))
    scalar = hidden.new_empty((), dtype=torch.float32)
    grad_h = torch.empty_like(hidden) if want_h else hidden.new_empty(0)
    grad_w = torch.empty_like(weight) if want_w else hidden.new_empty(0)
    return scalar, grad_h, grad_w, torch.empty_like(scalar)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    _, grad_h, grad_w, scale = output
    ctx.mark_non_differentiable(grad_h, grad_w, scale)
    ctx.save_for_backward(grad_h, grad_w, scale)
    ctx.want = inputs[6:8]


def _backward(ctx, grad_out, *_):  # type: ignore[no-untyped-def]
    grad_h, grad_w, _scale = ctx.saved_tensors  # already scaled by the reduction
    # the usual upstream gradient is 1 (the loss itself): then no pass over dW [V, H]; the check
    # needs the value: only for a real CPU tensor (free there; a sync on a GPU; no value when traced)
    unit = type(grad_out) is torch.Tensor and grad_out.device.type == "cpu" and bool(grad_out == 1)
    dh = (grad_h if unit else grad_h * grad_out.to(grad_h.dtype)) if ctx.want[0] else None
    dw = (grad_w if unit else grad_w * grad_out.to(grad_w.dtype)) if ctx.want[1] else None
    return dh, dw, None, None, None, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def lm_head_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    name: str,
    chunk_size: int | None,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check an LM-head op's ``hidden [*, H]``, ``weight [V, H]`` and ``targets [*]`` (called ``name``
    in messages) and return hidden and weight cast to the autocast dtype when autocast is on (the
    casts are differentiable, so fp32 master weights get fp32 gradients)."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not fit: "
            "expected hidden [*, H] and weight [V, H]"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"{name} {tuple(targets.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {targets.dtype}")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(f"hidden on {hidden.device}, weight on {weight.device}, {name} on {targets.device}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    amp = autocast_dtype(hidden.device)
    if amp is not None:
        hidden, weight = cast_for_autocast(amp, hidden, weight)
    if hidden.dtype not in dtypes or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one float dtype")
    return hidden, weight


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden [*, H] @ weight[V, H]ᵀ`` against ``labels [*]``, chunked (the op
    ``fastpeft::linear_cross_entropy``).

    ``reduction``: ``"mean"`` over non-ignored rows (0 when there are none) or ``"sum"``.
    Under autocast, hidden and weight are cast to the autocast dtype first (the casts are
    differentiable, so fp32 master weights get fp32 gradients).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden, weight = lm_head_inputs(hidden, weight, labels, "labels", chunk_size)
    grad = torch.is_grad_enabled()
    loss, _, _, _ = torch.ops.fastpeft.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1).long(),
        ignore_index,
        reduction == "mean",
        chunk_size or 0,
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
    )
    return loss
