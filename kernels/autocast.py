"""Our autograd ops follow ``torch.autocast`` the way ``nn.Linear`` does.

A custom ``autograd.Function`` is invisible to autocast, so without this a LoRA layer inside
``torch.autocast("cuda", torch.bfloat16)`` would see bf16 activations next to fp32 adapters. At the
op's entry the floating inputs are cast to the autocast dtype (differentiably: fp32 master
parameters get fp32 gradients) and autocast is switched off inside, so the kernel sees one dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["autocast_dtype", "cast_for_autocast", "autocast_off"]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` right now, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def cast_for_autocast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each floating tensor in ``dtype`` (None and non-floating tensors pass through)."""
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device`` (our kernels take inputs already in one dtype)."""
    with torch.autocast(device.type, enabled=False):
        yield
