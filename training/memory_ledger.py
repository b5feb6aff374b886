"""The memory ledger: peak bytes of tensor storage alive at once during a training step, by category.

:class:`MemoryTracker` is a ``TorchDispatchMode``: every storage an op creates is counted from the
op that creates it until Python frees its last reference (a weakref callback), which is when the
CUDA caching allocator would take the memory back. The peak is the largest sum seen after any op,
with the category totals at that moment. The same code counts real tensors and FakeTensors, so a
step run under ``FakeTensorMode`` on fake CPU tensors (no memory, no arithmetic) measures what the
same step allocates on a GPU; ``tests/training/test_memory_ledger.py`` checks that a real CPU run
and a fake one give the same peak.

Categories (each storage gets one, from where it was made):

- ``weights``: frozen parameters and buffers (registered by the caller before the step);
- ``trainable``: trainable parameters, their gradients (relabelled as they are accumulated) and the
  optimizer state (allocated in the ``optimizer`` phase);
- ``activations``: made in the ``forward`` phase and still alive: what the forward saves for the
  backward (checkpointed block inputs, or every block's activations without checkpointing);
- ``backward``: made in the ``backward`` phase: recomputed activations of checkpointed blocks and
  activation gradients. (Grad mode cannot tell the two apart: custom autograd Functions run their
  forward with grad off even during a recompute.)
- ``loss``: made in the ``loss`` phase (LM head + cross-entropy);
- ``workspace``: allocated inside :func:`fastpeft.kernels.workspace.allocation_kind` ``("workspace")``.

Storages made inside ``allocation_kind("host")`` are host memory (an offloader's copies): they are
counted apart (``host_peak``) and never in the device peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastpeft.kernels.workspace import current_allocation_kind, observe_allocations

CATEGORIES = ("weights", "trainable", "activations", "backward", "loss", "workspace")
CATEGORY_LABELS = {
    "weights": "weights (frozen)",
    "trainable": "adapters + grads + optimizer state",
    "activations": "activations saved by the forward",
    "backward": "backward: recomputed activations + grads",
    "loss": "loss (LM head + cross-entropy)",
    "workspace": "workspaces",
}
PHASES = ("setup", "forward", "loss", "backward", "optimizer")
GiB = 2**30


@dataclasses.dataclass
class LedgerResult:
    """One measured step: device peak and its breakdown, host (offloaded) peak, and notes."""

    peak_bytes: int
    peak_by_category: dict[str, int]
    peak_phase: str  # the phase in which the peak was reached, e.g. "backward"
    host_peak_bytes: int
    final_bytes: int  # alive after the step (weights, trainable state, workspaces)
    ops: int
    notes: list[str] = dataclasses.field(default_factory=list)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MemoryTracker(TorchDispatchMode):
    """Counts storage bytes alive at once, by category (see the module docstring).

    Use: ``tracker.register(t, "weights")`` for tensors made before the step, ``tracker.watch_grads(
    params)``, then run the step inside ``with tracker:`` with ``tracker.set_phase(...)`` before the
    forward, loss, backward and optimizer step.
    """

    def __init__(self, detail: bool = False) -> None:
        super().__init__()
        self._live: dict[int, tuple[int, str, weakref.ref]] = {}  # id(storage) -> (bytes, category, ref)
        self.detail = detail  # keep, at the peak, what made each live storage (slower: for investigation)
        self._origin: dict[int, str] = {}
        self._op = "before the step"
        self.peak_storages: list[tuple[int, str, str]] = []  # (bytes, category, origin) at the peak
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.peak_by_category = dict(self.current)
        self.peak_phase = "setup"
        self.host = 0
        self.host_peak = 0
        self.ops = 0
        self._phase = "setup"
        self._pending = 0  # transient bytes a fake implementation reported for the op now running

    # -- labelling --------------------------------------------------------------------------------
    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self._phase = phase

    def _category(self) -> str:
        kind = current_allocation_kind()
        if kind is not None:
            return kind  # "workspace" or "host"
        return {
            "setup": "weights",
            "forward": "activations",
            "backward": "backward",
            "loss": "loss",
            "optimizer": "trainable",
        }[self._phase]

    def _add(self, key: int, nbytes: int, category: str) -> None:
        if category == "host":
            self.host += nbytes
            self.host_peak = max(self.host_peak, self.host)
            return
        self.current[category] += nbytes
        self.total += nbytes
        if self.total > self.peak:
            self.peak = self.total
            self.peak_by_category = dict(self.current)
            self.peak_phase = self._phase
            if self.detail:
                self.peak_storages = sorted(
                    ((b, c, self._origin.get(k, "?")) for k, (b, c, _) in self._live.items()), reverse=True
                )

    def _sub(self, nbytes: int, category: str) -> None:
        if category == "host":
            self.host -= nbytes
        else:
            self.current[category] -= nbytes
            self.total -= nbytes

    def _freed(self, key: int, _ref: weakref.ref) -> None:
        entry = self._live.pop(key, None)
        self._origin.pop(key, None)
        if entry is not None:
            self._sub(entry[0], entry[1])

    def track(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Count ``tensor``'s storage (once) as ``category`` (default: from the phase)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        entry = self._live.get(key)
        size = storage.nbytes()
        if entry is not None:
            if category is None or entry[1] == category:
                return
            self._sub(entry[0], entry[1])  # relabel an existing storage
            ref = entry[2]
        else:
            ref = weakref.ref(storage, functools.partial(self._freed, key))
        category = category or self._category()
        self._live[key] = (size, category, ref)
        if self.detail and entry is None:
            self._origin[key] = f"{self._phase}: {self._op} {tuple(tensor.shape)} {tensor.dtype}"
        self._add(key, size, category)

    def register(self, tensor: torch.Tensor, category: str) -> None:
        """Label a tensor made before the step (weights, trainable parameters) or relabel one."""
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        self.track(tensor, category)

    def register_module(self, module: torch.nn.Module) -> None:
        """Trainable parameters as ``trainable``, every other parameter and buffer as ``weights``."""
        for p in module.parameters():
            self.register(p, "trainable" if p.requires_grad else "weights")
        for b in module.buffers():
            if id(b.untyped_storage()) not in self._live:
                self.register(b, "weights")

    def watch_grads(self, params: Iterable[torch.nn.Parameter]) -> list[Any]:
        """Relabel each gradient as ``trainable`` once it is accumulated into ``.grad``; returns the hook handles."""

        def relabel(p: torch.nn.Parameter) -> None:
            if p.grad is not None:
                self.register(p.grad, "trainable")

        return [p.register_post_accumulate_grad_hook(relabel) for p in params]

    # -- what fake implementations report (fastpeft.kernels.workspace) ------------------------------
    def allocated(self, tensor: torch.Tensor, kind: str) -> None:
        self.track(tensor, "workspace" if kind == "workspace" else None)

    def transient(self, nbytes: int) -> None:
        self._pending += nbytes  # on top of the op's outputs, which arrive when the op returns

    def __enter__(self) -> MemoryTracker:
        self._observing = observe_allocations(self)
        self._observing.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._observing.__exit__(*exc)

    # -- dispatch ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if self.detail:
            self._op = str(func)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        if self._pending:
            pending, self._pending = self._pending, 0
            self._add(-1, pending, self._category())
            self._sub(pending, self._category())
        return out

    def result(self, notes: Iterable[str] = (), **meta: Any) -> LedgerResult:
        return LedgerResult(
            peak_bytes=self.peak,
            peak_by_category=dict(self.peak_by_category),
            peak_phase=self.peak_phase,
            host_peak_bytes=self.host_peak,
            final_bytes=self.total,
            ops=self.ops,
            notes=list(notes),
            meta=dict(meta),
        )


def format_gib(nbytes: float) -> str:
    """GiB with two decimals; MiB below 0.1 GiB (small models)."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= 0.1 * GiB or nbytes == 0 else f"{nbytes / 2**20:.1f} MiB"


def format_ledger_table(columns: dict[str, LedgerResult]) -> str:
    """A markdown table: one column per measured step (e.g. fastpeft vs the HF baseline), rows by category."""
    names = list(columns)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for cat in CATEGORIES:
        lines.append(
            f"| {CATEGORY_LABELS[cat]} | "
            + " | ".join(format_gib(columns[n].peak_by_category[cat]) for n in names)
            + " |"
        )
    lines.append(
        "| **peak (device)** | " + " | ".join(f"**{format_gib(columns[n].peak_bytes)}**" for n in names) + " |"
    )
    lines.append("| peak reached in | " + " | ".join(columns[n].peak_phase for n in names) + " |")
    lines.append(
        "| offloaded to host (peak) | " + " | ".join(format_gib(columns[n].host_peak_bytes) for n in names) + " |"
    )
    return "\n".join(lines)


@contextlib.contextmanager
def cuda_attention_rules() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` on the backend CUDA would pick, whatever the device.

    On fake CPU tensors SDPA takes the CPU flash kernel for every dtype, which saves only the output
    and log-sum-exp. CUDA (torch 2.11, sm80+) has no such kernel for every input: flash needs
    fp16/bf16 and no mask; memory-efficient takes fp32 and masks but not grouped-query heads; what
    neither takes runs the math backend, which materializes ``[B, H, T, T]`` scores and softmax
    (e.g. the HF + bnb + PEFT baseline, whose fp32 norms make q/k/v fp32, with 8 KV heads for 32).
    Flash and memory-efficient save what the CPU flash kernel saves; for math the math backend runs
    here too. The function is replaced on ``torch.nn.functional`` for the block (a function mode
    would not reach a checkpointed layer's recompute, which the autograd engine runs without it).
    """
    from unittest import mock

    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def as_on_cuda(*args: Any, **kwargs: Any) -> torch.Tensor:
        if cuda_sdpa_backend(*args, **kwargs) == "math":
            with sdpa_kernel([SDPBackend.MATH]):
                return sdpa(*args, **kwargs)
        return sdpa(*args, **kwargs)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", as_on_cuda):
        yield


def cuda_sdpa_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Any = None,
    enable_gqa: bool = False,
) -> str:
    """``"flash"``, ``"efficient"`` or ``"math"``: what SDPA on an H100 would run for these inputs."""
    head_dims = {query.shape[-1], key.shape[-1], value.shape[-1]}
    dims_ok = len(head_dims) == 1 and max(head_dims) <= 256 and max(head_dims) % 8 == 0
    grouped = enable_gqa and query.shape[-3] != key.shape[-3]
    if query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and dims_ok:
        return "flash"
    if query.dtype in (torch.float16, torch.bfloat16, torch.float32) and not grouped and dims_ok:
        return "efficient"
    return "math"
