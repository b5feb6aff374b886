"""Scratch buffers reused across layers: one grow-only buffer per (name, dtype, device, stream).

Why: the training path dequantizes each NF4 weight into a dense buffer right before its GEMM; a
fresh allocation per layer would keep (or churn through) a dense copy of every layer. One buffer
sized for the largest layer is enough, because kernels on one stream run in order: the next
layer's dequantization is queued after the previous GEMM that read the buffer. The stream (on the
CPU: the thread) is part of the key so that work on two streams never shares a buffer.

``zeroed=True`` buffers start as zeros and their users promise to leave them zero (the decode
kernel's split-K accumulators and arrival counters reset themselves), so no memset per call.

CUDA graphs: call the op once before capture so the buffers exist outside the graph's pool.

Under a trace (FakeTensorMode, torch.compile's AOTAutograd pass) a workspace is a fresh
allocation, never cached: the compiled graph plans its own buffers, and a fake tensor must not
outlive its trace in this cache. The ops' fake implementations allocate no workspace at all (a
workspace is held across calls, not per call); each one names the workspaces its real path uses.
"""

from __future__ import annotations

import threading

import torch

from fastpeft.kernels.backend import tracing

_buffers: dict[tuple[str, torch.dtype, torch.device, int | None], torch.Tensor] = {}


def _stream_key(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return threading.get_ident() if device.type == "cpu" else None


def get_workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device,
                  zeroed: bool = False) -> torch.Tensor:  # fmt: skip
    """A 1-D view of ``numel`` elements of the shared buffer ``name`` (grown, never shrunk).

    The contents are whatever the previous user left (zeros for ``zeroed`` buffers, by contract).
    """
    if numel < 0:
        raise ValueError(f"workspace {name!r}: numel must be >= 0, got {numel}")
    device = torch.device(device)
    if tracing():
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
        with torch.inference_mode(False):
            buf = alloc(max(numel, 1), dtype=dtype, device=device)
        _buffers[key] = buf
    return buf[:numel]


def workspace_bytes() -> int:
    """Bytes currently held by all workspaces."""
    return sum(b.numel() * b.element_size() for b in _buffers.values())


def clear_workspaces() -> None:
    """Free every workspace (e.g. between training and generation); they are re-made on demand."""
    _buffers.clear()
