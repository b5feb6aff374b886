"""The one dispatch switch: which implementation of a kernel runs for given tensors.

- CUDA tensors run the Triton kernels.
- CPU tensors run the torch reference, unless ``TRITON_INTERPRET=1`` was set before
  :mod:`fastpeft.kernels` was imported, in which case the Triton kernels run in Triton's
  interpreter on the CPU (slow; meant for tests on small shapes).
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

Backend = Literal["triton", "torch"]
_BACKENDS = ("triton", "torch")
_forced: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("fastpeft_backend", default=None)


def interpreting() -> bool:
    """True when Triton kernels are decorated for the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend(*tensors: torch.Tensor) -> Backend:
    """Return ``"triton"`` or ``"torch"`` for an operation on ``tensors`` (device taken from the first)."""
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
    forced = _forced.get()
    if forced == "torch":
        return "torch"
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
