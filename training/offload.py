"""Offloaded activation checkpointing: checkpointed layer inputs wait in host memory, not on the device.

With gradient checkpointing each transformer block keeps only its input ``[B, T, H]`` for the
backward; over L layers that is ``L·B·T·H`` elements on the device, the largest term at long
context (8B, 80k tokens: 20 GiB in bf16). Here each block's input is copied to (pinned) host memory
during the forward, on a side stream so the copy overlaps the next block's compute, and its device
copy is freed as soon as the copy has run. In the backward, block i fetches its input back and
at once starts copying block i-1's input on the side stream, so the transfer overlaps block i's
recompute and backward: at most two block inputs are on the device at a time (double buffering).

On the CPU the same code runs (the copies are ordinary copies into separate host buffers, no
streams), so gradients are exactly those of plain checkpointing; the memory ledger counts the host
buffers apart (they are allocated inside ``allocation_kind("host")``).

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
        self.ready: Any = None  # CUDA event: the copy into ``device_copy`` (or out of the device) is done
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
            raise RuntimeError("this offloaded activation was already fetched: a second backward through a "
                               "graph with offloaded checkpoints needs the forward to run again")  # fmt: skip
        self.prefetch(stash)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(stash.ready)
        x, stash.device_copy, stash.host = stash.device_copy, None, None
        self.prefetch(stash.previous() if stash.previous is not None else None)
        return x


def _autocast_state(device_type: str) -> dict[str, Any]:
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type), "cache_enabled": torch.is_autocast_cache_enabled()}  # fmt: skip


class _OffloadedCheckpoint(torch.autograd.Function):
    """Forward without saving anything but the host copy of ``x``; backward fetches, recomputes, backprops.

    ``anchor`` is a leaf that requires grad, so the output requires grad (and the backward runs)
    even when ``x`` does not, e.g. the first block's input under LoRA with frozen embeddings.
    """

    @staticmethod
    def forward(ctx, run, offloader, anchor, x):  # type: ignore[override]
        ctx.run, ctx.offloader = run, offloader
        ctx.stash = offloader.offload(x)
        ctx.x_meta = (x.requires_grad,)
        ctx.autocast = _autocast_state(x.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        device = ctx.offloader.device
        devices = [device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=device.type), torch.enable_grad(), \
             torch.autocast(**ctx.autocast):  # fmt: skip
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, device)
            x = ctx.offloader.fetch(ctx.stash).detach().requires_grad_(True)
            out = ctx.run(x)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return None, None, None, x.grad if ctx.x_meta[0] else None


def offloaded_checkpoint(offloader: ActivationOffloader, anchor: torch.Tensor, function: Callable[..., Any],
                         *args: Any, **kwargs: Any) -> Any:  # fmt: skip
    """``checkpoint(function, x)`` with ``x`` (the block input, ``args[0]``) held in host memory.

    Further positional arguments and ``kwargs`` are bound into the recompute; none of them may need
    a gradient (transformers passes masks and rotary embeddings there).
    """
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError("offloaded checkpointing needs the block input tensor as the first positional argument")
    x, rest = args[0], args[1:]
    for value in (*rest, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise ValueError("offloaded checkpointing gives gradients to the block input only, but another "
                             f"argument of shape {tuple(value.shape)} requires grad")  # fmt: skip

    def run(inp: torch.Tensor) -> Any:
        return function(inp, *rest, **kwargs)

    return _OffloadedCheckpoint.apply(run, offloader, anchor, x)


def enable_offloaded_checkpointing(model: nn.Module) -> ActivationOffloader:
    """Checkpoint every transformers ``GradientCheckpointingLayer`` of ``model`` with offloading.

    Returns the offloader (its device is the model's). Calling transformers'
    ``gradient_checkpointing_enable`` afterwards switches back to plain checkpointing.
    """
    if not hasattr(model, "_set_gradient_checkpointing"):
        raise TypeError(f"offloaded checkpointing needs a transformers model, got {type(model).__name__}")
    device = next(model.parameters()).device
    offloader = ActivationOffloader(device)
    anchor = torch.zeros((), device=device, requires_grad=True)  # never updated: not a parameter

    def checkpoint_fn(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return offloaded_checkpoint(offloader, anchor, function, *args, **kwargs)

    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpoint_fn)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    model._fastpeft_offloader = offloader
    return offloader
