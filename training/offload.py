"""Offloaded activation checkpointing: checkpointed layer inputs wait in host memory, not on the device.

With gradient checkpointing each transformer block keeps only its input ``[B, T, H]`` for the
backward; over L layers that is ``L·B·T·H`` elements on the device, the largest term at long
context (8B, 80k tokens: 20 GiB in bf16). Here each block's input is copied to (pinned) host memory
during the forward, on a side stream so the copy overlaps the next block's compute, and its device
copy is freed as soon as the copy has run. In the backward, block i fetches its input back and
at once starts copying block i-1's input on the side stream, so the transfer overlaps block i's
recompute and backward: at most two block inputs are on the device at a time (double buffering).

The recompute is torch's non-reentrant checkpoint (each recomputed tensor is freed once its
backward node has used it); only the block input takes the detour through host memory. On the
CPU the same code runs (the copies are ordinary copies into separate host buffers, no streams),
so gradients are exactly those of plain checkpointing; the memory ledger counts the host buffers
apart (they are allocated inside ``allocation_kind("host")``).

Use: :func:`enable_offloaded_checkpointing` on a transformers model (it replaces the model's
checkpoint function, so every ``GradientCheckpointingLayer`` block is recomputed this way).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastpeft.kernels.workspace import allocation_kind


class _Stash:
    """One block input: its host copy, and its device copy while it is being fetched back."""

    def __init__(self, host: torch.Tensor, previous: _Stash | None) -> None:
        self.host: torch.Tensor | None = host
        self.device_copy: torch.Tensor | None = None
        self.ready: Any = None  # CUDA event recorded after the copy into ``device_copy``
        self.previous = weakref.ref(previous) if previous is not None else None


class ActivationOffloader:
    """Moves tensors to host memory and back, with one fetch in flight ahead of its use."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._last: _Stash | None = None

    def _side(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def offload(self, x: torch.Tensor) -> _Stash:
        """Start copying ``x`` to host memory; ``x`` itself can be dropped right away."""
        with allocation_kind("host"):
            host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=self.cuda)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # x is written
            with self._side():
                host.copy_(x, non_blocking=True)
            x.record_stream(self.stream)  # the allocator keeps x's memory until the copy has run
        else:
            host.copy_(x)
        stash = _Stash(host, self._last)
        self._last = stash
        return stash

    def prefetch(self, stash: _Stash | None) -> None:
        """Start copying ``stash`` back to the device (no-op if it is under way or consumed)."""
        if stash is None or stash.host is None or stash.device_copy is not None:
            return
        device_copy = torch.empty(stash.host.shape, dtype=stash.host.dtype, device=self.device)
        if self.cuda:
            # the new buffer may reuse memory the compute stream used a moment ago
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with self._side():
                device_copy.copy_(stash.host, non_blocking=True)
                stash.ready = torch.cuda.Event()
                stash.ready.record(self.stream)
        else:
            device_copy.copy_(stash.host)
        stash.device_copy = device_copy

    def fetch(self, stash: _Stash) -> torch.Tensor:
        """The device copy of ``stash`` (waiting for its prefetch), then the previous stash's prefetch starts."""
        if stash.host is None:
            raise RuntimeError(
                "this offloaded activation was already fetched: a second backward through a "
                "graph with offloaded checkpoints needs the forward to run again"
            )
        self.prefetch(stash)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(stash.ready)
        x, stash.device_copy, stash.host = stash.device_copy, None, None
        self.prefetch(stash.previous() if stash.previous is not None else None)
        return x


class _Recompute:
    """The recompute context of one checkpointed block: its input comes back from host memory."""

    def __init__(self, offloader: ActivationOffloader, box: list[Any], stash: list[_Stash]) -> None:
        self.offloader, self.box, self.stash = offloader, box, stash

    def __enter__(self) -> None:
        self.box[0] = self.offloader.fetch(self.stash[0])

    def __exit__(self, *exc: object) -> None:
        self.box[0] = None  # the recomputed graph keeps what it saved of it


def offloaded_checkpoint(
    offloader: ActivationOffloader, function: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``checkpoint(function, *args, **kwargs)`` (non-reentrant) with ``args[0]``, the block input,
    held in host memory between the forward and the recompute.

    torch's non-reentrant checkpoint keeps the function's arguments alive for the recompute; here
    the block input reaches the function through a box that is emptied after the forward and
    refilled from the host copy when the backward recomputes the block. Gradients flow through
    the forward's graph as with plain checkpointing (the RNG and autocast state are replayed).
    """
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError("offloaded checkpointing needs the block input tensor as the first positional argument")
    from torch.utils.checkpoint import checkpoint

    box: list[Any] = [args[0]]
    stash: list[_Stash] = []
    rest = args[1:]

    def run() -> Any:
        return function(box[0], *rest, **kwargs)

    out = checkpoint(
        run, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _Recompute(offloader, box, stash))
    )
    stash.append(offloader.offload(box[0]))
    box[0] = None
    return out


def enable_offloaded_checkpointing(model: nn.Module) -> ActivationOffloader:
    """Checkpoint every transformers ``GradientCheckpointingLayer`` of ``model`` with offloading.

    Returns the offloader (its device is the model's). Calling transformers'
    ``gradient_checkpointing_enable`` afterwards switches back to plain checkpointing.
    """
    if not hasattr(model, "_set_gradient_checkpointing"):
        raise TypeError(f"offloaded checkpointing needs a transformers model, got {type(model).__name__}")
    offloader = ActivationOffloader(next(model.parameters()).device)

    def checkpoint_fn(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return offloaded_checkpoint(offloader, function, *args, **kwargs)

    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpoint_fn)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    model._fastpeft_offloader = offloader
    return offloader
