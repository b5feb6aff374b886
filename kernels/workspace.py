"""Scratch buffers reused across layers: one grow-only buffer per (name, dtype, device, stream).

Why: the training path dequantizes each NF4 weight into a dense buffer right before its GEMM; a
fresh allocation per layer would keep (or churn through) a dense copy of every layer. One buffer
sized for the largest layer is enough, because kernels on one stream run in order: the next
layer's dequantization is queued after the previous GEMM that read the buffer. The stream (on the
CPU: the thread) is part of the key so that work on two streams never shares a buffer.

``zeroed=True`` buffers start as zeros and their users promise to leave them zero (the decode
kernel's split-K accumulators and arrival counters reset themselves), so no memset per call.

CUDA graphs: call the op once before capture so the buffers exist outside the graph's pool.

Under a trace (torch.compile's AOTAutograd pass, export) a workspace is a fresh allocation, never
cached: the compiled graph plans its own buffers, and a fake tensor must not outlive its trace in
this cache. The memory ledger (``fastpeft.training.memory_ledger``) is the exception: it runs its
fake step inside :func:`isolated_workspaces`, so there workspaces are cached as on a GPU, in a
private set that dies with the step.

Memory accounting hook (the ledger):

- :func:`get_workspace` allocates inside ``allocation_kind("workspace")`` and tells the installed
  observers about every buffer it makes; an activation offloader allocates its host copies inside
  ``allocation_kind("host")``. The ledger reads :func:`current_allocation_kind` for each storage it
  sees created and is an observer itself.
- An op's implementation (real or ``register_fake``) runs below the ledger's dispatch mode, so the
  ledger sees only the op's outputs. To be counted as on a GPU, an op calls :func:`get_workspace`
  for its workspaces (the fake implementations only when :func:`accounting` is True: under
  torch.compile nobody observes) and :func:`note_transient` for big temporaries it frees before
  returning (e.g. the loss's ``[C, V]`` logits chunk).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from fastpeft.kernels.backend import tracing

_buffers: dict[tuple[str, torch.dtype, torch.device, int | None], torch.Tensor] = {}
_isolated = 0  # depth of isolated_workspaces(): there even a trace's workspaces are cached
_kinds: list[str] = []
_observers: list[Any] = []  # objects with .allocated(tensor, kind) and .transient(nbytes)
MEMORY_KINDS = ("workspace", "host")


@contextlib.contextmanager
def observe_allocations(observer: Any) -> Iterator[None]:
    """Tell ``observer`` (``.allocated(tensor, kind)``, ``.transient(nbytes)``) about special allocations."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def accounting() -> bool:
    """True while a memory ledger observes allocations (fake implementations may then allocate workspaces)."""
    return bool(_observers)


def note_transient(nbytes: int) -> None:
    """For ``register_fake`` implementations: the real op holds ``nbytes`` more for a moment (a
    temporary freed before it returns) on top of its outputs; the ledger counts it at its peak."""
    for observer in _observers:
        observer.transient(int(nbytes))


@contextlib.contextmanager
def allocation_kind(kind: str) -> Iterator[None]:
    """Label the tensors allocated inside the block as ``kind`` ("workspace" or "host") for accounting."""
    if kind not in MEMORY_KINDS:
        raise ValueError(f"kind must be one of {MEMORY_KINDS}, got {kind!r}")
    _kinds.append(kind)
    try:
        yield
    finally:
        _kinds.pop()


def current_allocation_kind() -> str | None:
    """The innermost :func:`allocation_kind` label, or None outside any."""
    return _kinds[-1] if _kinds else None


@contextlib.contextmanager
def isolated_workspaces() -> Iterator[None]:
    """Run the block with an empty set of workspaces, restoring the previous set after it (the
    memory ledger's FakeTensor buffers must never be handed to a real kernel, and vice versa)."""
    global _buffers, _isolated
    saved, _buffers = _buffers, {}
    _isolated += 1
    try:
        yield
    finally:
        _buffers = saved
        _isolated -= 1


def _stream_key(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return threading.get_ident() if device.type == "cpu" else None


def get_workspace(
    name: str, numel: int, dtype: torch.dtype, device: torch.device, zeroed: bool = False
) -> torch.Tensor:
    """A 1-D view of ``numel`` elements of the shared buffer ``name`` (grown, never shrunk).

    The contents are whatever the previous user left (zeros for ``zeroed`` buffers, by contract).
    """
    if numel < 0:
        raise ValueError(f"workspace {name!r}: numel must be >= 0, got {numel}")
    device = torch.device(device)
    if tracing() and not _isolated:
        return (torch.zeros if zeroed else torch.empty)(numel, dtype=dtype, device=device)
    key = (name, dtype, device, _stream_key(device))
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        # Drop the old buffer first so the allocator can reuse its memory for the larger one.
        _buffers.pop(key, None)
        del buf
        alloc = torch.zeros if zeroed else torch.empty
        # a normal tensor even when first made under inference_mode (a sampler): the training step
        # that writes the same buffer next runs outside it, where inference tensors are read-only
        with torch.inference_mode(False), allocation_kind("workspace"):
            buf = alloc(max(numel, 1), dtype=dtype, device=device)
        _buffers[key] = buf
        for observer in _observers:
            observer.allocated(buf, "workspace")
    return buf[:numel]


def workspace_bytes() -> int:
    """Bytes currently held by all workspaces."""
    return sum(b.numel() * b.element_size() for b in _buffers.values())


def clear_workspaces() -> None:
    """Free every workspace (e.g. between training and generation); they are re-made on demand."""
    _buffers.clear()
