"""Our autograd ops follow ``torch.autocast`` the way ``nn.Linear`` does.

A custom ``autograd.Function`` is invisible to autocast, so without this a LoRA layer inside
``torch.autocast("cuda", torch.bfloat16)`` would see bf16 activations next to fp32 adapters. At the
op's entry the floating inputs are cast to the autocast dtype (differentiably: fp32 master
parameters get fp32 gradients) and autocast is switched off inside, so the kernel sees one dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["autocast_dtype", "autocast_off", "cast_for_autocast", "compute_dtype"]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` right now, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on ``x`` computes in: autocast's on ``x``'s device, else ``x``'s own."""
    return autocast_dtype(x.device) or x.dtype


def cast_for_autocast(dtype: torch.dtype, *values: Any) -> list[Any]:
    """Each floating tensor in ``dtype``; anything else (None, integer tensors, an NF4 weight) as is."""
    return [v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in values]


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device`` (our kernels take inputs already in one dtype); free when it is off."""
    if not torch.is_autocast_enabled(device.type):
        yield
        return
    with torch.autocast(device.type, enabled=False):
        yield
