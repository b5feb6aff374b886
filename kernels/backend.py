"""The one dispatch switch: which implementation of a kernel runs for given tensors.

- CUDA tensors run the Triton kernels.
- CPU tensors run the torch implementation, unless ``TRITON_INTERPRET=1`` was set before
  :mod:`fastpeft.kernels` was imported, in which case the Triton kernels run in Triton's
  interpreter on the CPU (slow; meant for tests on small shapes).
- :func:`force_backend` overrides the choice inside a ``with`` block (tests use it to pin a path).

No other module decides this. The choice is made inside the ``fastpeft::`` custom ops (every
kernel file registers its launchers with ``torch.library``), so Dynamo never reads the switch:
:func:`torch.compile` sees one opaque op call and no graph break. When AOTAutograd traces an op
for Inductor, the choice is made once, at compile time: CUDA ops trace their Triton launches
(through ``wrap_triton``), CPU ops their torch implementation (the interpreter cannot run on the
fake tensors of a trace). :func:`force_backend` therefore pins eager calls and compilations that
start inside its block.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import is_fake

Backend = Literal["triton", "torch"]
_BACKENDS = ("triton", "torch")
_forced: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("fastpeft_backend", default=None)
_TRACING_MODES = (
    torch._C._TorchDispatchModeKey.FAKE,
    torch._C._TorchDispatchModeKey.FUNCTIONAL,
    torch._C._TorchDispatchModeKey.PROXY,
)


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


def tracing(*tensors: Any) -> bool:
    """True while tensors are traced rather than computed: FakeTensorMode (the memory ledger),
    AOTAutograd under torch.compile, export, make_fx. Kernels cannot launch on such tensors and
    caches (workspaces, constant tables) must not keep them."""
    if any(isinstance(t, torch.Tensor) and is_fake(t) for t in tensors):
        return True
    return any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES)


def tile_starts(total: int, step: int, like: object) -> range | list[int]:
    """Start offsets of a loop over ``total`` rows in steps of ``step`` (``range(0, total, step)``).

    On FakeTensors (``like`` is one) only the first two steps and the last run: every later step of
    a tiled loop repeats the second one's allocations exactly (tiles write into preallocated outputs
    and sum in place), so the peak memory is the same and the memory ledger's cost does not grow
    with the sequence length.
    """
    starts = range(0, total, step)
    if not (isinstance(like, torch.Tensor) and is_fake(like)) or len(starts) <= 3:
        return starts
    return [starts[0], starts[1], starts[-1]]


def use_triton(t: torch.Tensor) -> bool:
    """Inside an op: launch the Triton kernel for ``t`` (else run the torch implementation)?

    :func:`backend`, except that a trace of CPU tensors takes the torch implementation.
    """
    return backend(t) == "triton" and (t.device.type == "cuda" or not tracing(t))


def triton_launcher(kernel: Any) -> Callable[..., Any]:
    """``kernel`` ready to index with a grid inside a ``torch.library.triton_op``: wrapped with
    ``wrap_triton`` so a trace records the launch; the interpreter's kernels (``TRITON_INTERPRET=1``,
    eager CPU calls only) launch directly, since torch < 2.13's ``wrap_triton`` rejects them."""
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)


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
