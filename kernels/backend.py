"""The one dispatch switch: which implementation of a kernel runs for given tensors.

- CUDA tensors run the Triton kernels.
- CPU tensors run the torch reference, unless ``TRITON_INTERPRET=1`` was set before
  :mod:`fastpeft.kernels` was imported, in which case the Triton kernels run in Triton's
  interpreter on the CPU (slow; meant for tests on small shapes).
- FakeTensors (shape-only tensors: the memory ledger's step, tracing) take the "triton" path on any
  device: each launcher checks its arguments, allocates its outputs and workspaces exactly as on
  CUDA, then returns before the launch (:func:`is_fake`), so memory accounting sees the CUDA
  path's allocations. ``force_backend("torch")`` still runs the reference on them.
- :func:`force_backend` overrides the choice inside a ``with`` block (tests use it to pin a path).

No other module decides this.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Literal

import torch
from torch._subclasses.fake_tensor import FakeTensor

Backend = Literal["triton", "torch"]
_BACKENDS = ("triton", "torch")
_forced: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("fastpeft_backend", default=None)


def interpreting() -> bool:
    """True when Triton kernels are decorated for the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_fake(tensor: object) -> bool:
    """True for a FakeTensor: a launcher then allocates what it would on CUDA and skips the launch."""
    return isinstance(tensor, FakeTensor)


def tile_starts(total: int, step: int, like: object) -> range | list[int]:
    """Start offsets of a loop over ``total`` rows in steps of ``step`` (``range(0, total, step)``).

    On FakeTensors (``like`` is one) only the first two steps and the last run: every later step of
    a tiled loop repeats the second one's allocations exactly (tiles write into preallocated outputs
    and sum in place), so the peak memory is the same and the memory ledger's cost does not grow
    with the sequence length.
    """
    starts = range(0, total, step)
    if not is_fake(like) or len(starts) <= 3:
        return starts
    return [starts[0], starts[1], starts[-1]]


def backend(*tensors: torch.Tensor) -> Backend:
    """Return ``"triton"`` or ``"torch"`` for an operation on ``tensors`` (device taken from the first)."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    forced = _forced.get()
    if forced == "torch":
        return "torch"
    if is_fake(first):
        return "triton"
    if forced == "triton":
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "force_backend('triton') on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                "before fastpeft.kernels is imported"
            )
        return "triton"
    if device.type == "cuda":
        return "triton"
    return "triton" if interpreting() else "torch"


@contextlib.contextmanager
def force_backend(name: Backend) -> Iterator[None]:
    """Run the enclosed block with every kernel pinned to ``name`` (``"triton"`` or ``"torch"``)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {_BACKENDS}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)
