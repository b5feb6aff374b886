"""Measurement core of ``fastpeft bench``: timing, memory, floors, rows and the run loop.

A scenario (``benchmarks/scenarios/*.py``) lists :class:`Case` objects; each case makes its
implementations (ours and the baselines) as :class:`ImplSpec`. For every implementation the harness

1. builds it; :class:`Unavailable` (a missing optional package, an unbuilt kernel) becomes a row
   whose status says so, never a crash;
2. checks its outputs against a float64 reference at the real shapes and records the relative
   error (``||got - ref|| / ||ref||``, worst over the outputs and gradients);
3. times it: ``triton.testing.do_bench(..., return_mode="median")`` on CUDA, the median of
   ``time.perf_counter`` runs on CPU;
4. measures peak memory: ``torch.cuda.max_memory_allocated`` above what was allocated before the
   call on CUDA, the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
   on CPU; plus the weights the implementation keeps resident;

then derives TFLOP/s or GB/s from the case's formulas (``formulas.py``) and two time ratios:
to the fastest comparable baseline (< 1 means faster) and to the hardware floor (>= 1; the floor
is measured in the same run on CUDA: device copy bandwidth and a large bf16 GEMM; n/a on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

OURS, BASELINE = "ours", "baseline"


class Unavailable(Exception):
    """An implementation that cannot run in this environment; ``str(exc)`` is the row's status."""


def not_installed(*packages: str) -> Unavailable:
    return Unavailable(f"not installed: {', '.join(packages)}")


def not_available(what: str, why: str) -> Unavailable:
    return Unavailable(f"not available in this build: {what} ({why})")


@dataclasses.dataclass
class Prepared:
    """An implementation ready to time.

    ``run`` is the timed call; it returns the tensors to check (outputs, then gradients) and
    ``reference`` the float64 tensors they should equal. Without a reference no check is made.
    """

    run: Callable[[], Any]
    reference: Callable[[], Sequence[torch.Tensor]] | None = None
    resident_bytes: int = 0  # weights this implementation keeps on the device
    bytes: float | None = None  # bytes this implementation moves per call (None: the case's)
    flops: float | None = None  # FLOPs of this implementation's op (None: the case's)
    backend: str | None = None  # "triton" or "torch" for our kernels


@dataclasses.dataclass
class Measured:
    """An implementation that measures itself (whole training steps, generation)."""

    median_ms: float
    peak_mem_bytes: int | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    rel_err: float | None = None
    backend: str | None = None


@dataclasses.dataclass
class ImplSpec:
    name: str
    role: str  # OURS or BASELINE
    build: Callable[[], Prepared | Measured]
    comparable: bool = True  # False: a different operation, shown for reference, not a competitor


@dataclasses.dataclass
class Case:
    """One shape of one scenario; ``make_impls(ctx)`` allocates its tensors only when it runs."""

    scenario: str
    group: str  # the series in plots, e.g. "4096→14336" or "fwd+bwd"
    x_name: str  # "M", "T", "N", "seq"
    x: int
    make_impls: Callable[[Context], list[ImplSpec]]
    metric: str  # "TFLOP/s" or "GB/s"
    flops: float | None = None
    bytes: float | None = None
    floor: tuple[str, float] | None = None  # ("hbm", bytes) or ("gemm", flops)
    tolerance: float = 2e-2  # largest relative error accepted by the check
    self_timed: bool = False  # implementations return Measured (whole workloads) instead of Prepared
    interleaved: bool = False  # time the implementations in alternating rounds (benchmarks/interleaved.py)
    target: tuple[str, float] | None = None  # ("speedup", 1.5): ours >= 1.5x; ("time_ratio", 2.0): <= 2x

    @property
    def label(self) -> str:
        return f"{self.group} {self.x_name}={self.x}"


@dataclasses.dataclass
class Context:
    device: torch.device
    small: bool
    floors: dict[str, float] | None = None  # {"copy_GBps": ..., "gemm_TFLOPs": ...} on CUDA
    cpu_warmup: int = 1
    cpu_reps: int = 5
    gpu_rep_ms: int = 100
    strict: bool = False  # raise errors of implementations instead of recording them
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # models shared by a scenario's cases
    resources: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)  # closed with it
    log: Callable[[str], None] = print


@dataclasses.dataclass
class Row:
    scenario: str
    group: str
    x_name: str
    x: int
    impl: str
    role: str
    status: str = "ok"
    median_ms: float | None = None
    metric: str = ""
    tflops: float | None = None
    gbps: float | None = None
    flops: float | None = None
    bytes: float | None = None
    floor_kind: str | None = None
    floor_ms: float | None = None
    vs_fastest_baseline: float | None = None
    vs_floor: float | None = None
    peak_mem_bytes: int | None = None
    mem_kind: str = ""
    rel_err: float | None = None
    tolerance: float | None = None
    comparable: bool = True
    backend: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def case(self) -> str:
        return f"{self.group} {self.x_name}={self.x}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# measurement primitives


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(fn: Callable[[], Any], ctx: Context) -> float:
    """Median wall time of ``fn`` in ms (do_bench on CUDA, perf_counter runs on CPU)."""
    if ctx.device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=ctx.gpu_rep_ms, return_mode="median"))
    for _ in range(ctx.cpu_warmup):
        fn()
    times = []
    for _ in range(max(1, ctx.cpu_reps)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    warmup: int,
    rounds: int,
    device: torch.device,
    calls: dict[str, int] | None = None,
    last_round: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds per call of each of ``fns`` over ``rounds`` rounds, one turn of each per round,
    the order reversed every other round: on a shared machine load changes hit every implementation
    alike, so per-round ratios are steadier than ratios of separately measured medians.

    A turn is ``calls[name]`` back-to-back calls (default 1; a short call repeated so that one
    preemption is a small share of its turn). ``last_round(name)``, a context manager, wraps each
    turn of the last round (e.g. to measure peak memory without an extra call)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            n = max(1, (calls or {}).get(name, 1))
            with last_round(name) if last_round is not None and i == rounds - 1 else contextlib.nullcontext():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(n):
                    fns[name]()
                synchronize(device)
                times[name].append((time.perf_counter() - start) / n)
    return times


def paired_round_ratios(ours: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """Time ratios ours / theirs from :func:`interleaved_times`, one per pair of consecutive rounds
    (the geometric mean of the two): whichever runs second in a round can be systematically slower
    (measured: ~4% for CPU training steps), and a pair has each order once, so that cancels."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    return [math.sqrt(ratios[i] * ratios[i + 1]) for i in range(0, len(ratios) - 1, 2)]


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def memory_kind(device: torch.device) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS rise"


class PeakMemory:
    """Peak memory inside a ``with`` block, in bytes (``.peak``; None where it cannot be measured).

    CUDA: ``max_memory_allocated`` minus what was allocated when the block began, or the absolute
    value with ``absolute=True`` (for whole models: everything the run holds). CPU: how far the
    process's peak RSS rose above its RSS when the block began.
    """

    def __init__(self, device: torch.device, absolute: bool = False) -> None:
        self.device, self.absolute = device, absolute
        self.peak: int | None = None
        self._before: int | None = None

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)
        if self.device.type == "cuda":
            self._before = 0 if self.absolute else torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            rss = _proc_status_kib("VmRSS")
            self._before = rss * 1024 if rss is not None and _reset_peak_rss() else None
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        if self._before is None:
            return
        if self.device.type == "cuda":
            self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._before)
        else:
            hwm = _proc_status_kib("VmHWM")
            self.peak = None if hwm is None else max(0, hwm * 1024 - self._before)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes ``fn`` allocates at its peak above what was allocated before it (None if unmeasurable)."""
    with PeakMemory(device) as window:
        out = fn()
        del out
    return window.peak


def measure_floors(device: torch.device) -> dict[str, float] | None:
    """Hardware floors measured now: device-to-device copy GB/s (read + write bytes) and bf16 GEMM TFLOP/s."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.bfloat16, device=device).normal_()  # 2 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    copy_gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    src = dst = None  # the lambda's cells too: frees 4 GiB before the GEMM
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn_like(a)
    ms = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    gemm_tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    a = b = None
    free_memory(device)
    return {"copy_GBps": copy_gbps, "gemm_TFLOPs": gemm_tflops}


def floor_ms(floor: tuple[str, float] | None, floors: dict[str, float] | None) -> float | None:
    """Time the hardware needs at best: bytes / copy bandwidth ("hbm") or FLOPs / GEMM rate ("gemm")."""
    if floor is None or floors is None:
        return None
    kind, amount = floor
    if kind == "hbm":
        return amount / (floors["copy_GBps"] * 1e9) * 1e3
    if kind == "gemm":
        return amount / (floors["gemm_TFLOPs"] * 1e12) * 1e3
    raise ValueError(f"unknown floor kind {kind!r}; expected 'hbm' or 'gemm'")


def relative_error(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """Worst ``||got - expected||_F / ||expected||_F`` over paired tensors, computed in float64."""
    if len(got) != len(expected):
        raise ValueError(f"check compares {len(got)} outputs with {len(expected)} reference tensors")
    worst = 0.0
    for g, e in zip(got, expected):
        if tuple(g.shape) != tuple(e.shape):
            raise ValueError(f"output shape {tuple(g.shape)} differs from the reference's {tuple(e.shape)}")
        e64 = e.detach().to(torch.float64)
        diff = (g.detach().to(device=e64.device, dtype=torch.float64) - e64).norm().item()
        worst = max(worst, diff / max(e64.norm().item(), 1e-30))
    return worst


def free_memory(device: torch.device) -> None:
    """Release what the last implementation held (CUDA only: a full gc.collect costs ~0.4 s on CPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# rows


def _base_row(case: Case, spec: ImplSpec, ctx: Context) -> Row:
    return Row(
        scenario=case.scenario,
        group=case.group,
        x_name=case.x_name,
        x=case.x,
        impl=spec.name,
        role=spec.role,
        metric=case.metric,
        flops=case.flops,
        bytes=case.bytes,
        floor_kind=case.floor[0] if case.floor else None,
        floor_ms=floor_ms(case.floor, ctx.floors),
        mem_kind=memory_kind(ctx.device),
        tolerance=case.tolerance,
        comparable=spec.comparable,
    )


def _fill_rates(row: Row) -> None:
    if not row.median_ms:
        return
    seconds = row.median_ms * 1e-3
    if row.flops:
        row.tflops = row.flops / seconds / 1e12
    if row.bytes:
        row.gbps = row.bytes / seconds / 1e9
    if row.floor_ms:
        row.vs_floor = row.median_ms / row.floor_ms


def _check(row: Row, prepared: Prepared) -> None:
    if prepared.reference is None:
        return
    got = prepared.run()
    got = (got,) if isinstance(got, torch.Tensor) else tuple(got)
    row.rel_err = relative_error(got, tuple(prepared.reference()))
    if not row.rel_err <= row.tolerance:  # also catches NaN
        row.status = f"MISMATCH: relative error {row.rel_err:.2e} > {row.tolerance:.0e}"


def run_impl(case: Case, spec: ImplSpec, ctx: Context) -> Row:
    """Build, check, time and measure one implementation of one case (errors become the status)."""
    row = _base_row(case, spec, ctx)
    try:
        built = spec.build()
        if isinstance(built, Measured):
            row.median_ms, row.peak_mem_bytes = built.median_ms, built.peak_mem_bytes
            row.extra, row.rel_err, row.backend = dict(built.extra), built.rel_err, built.backend
        else:
            row.backend = built.backend
            row.bytes = row.bytes if built.bytes is None else built.bytes
            row.flops = row.flops if built.flops is None else built.flops
            _check(row, built)
            row.median_ms = median_time_ms(built.run, ctx)
            transient = peak_memory_bytes(built.run, ctx.device)
            row.peak_mem_bytes = None if transient is None else transient + built.resident_bytes
        _fill_rates(row)
    except Unavailable as exc:
        row.status = str(exc)
    except Exception as exc:  # one broken implementation must not cost the rest of the run
        if ctx.strict:
            raise
        traceback.print_exc(file=sys.stderr)
        row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        built = None
        free_memory(ctx.device)
    return row


def set_ratios(rows: list[Row]) -> None:
    """Fill ``vs_fastest_baseline`` (time / fastest comparable baseline's time) for one case's rows.

    A row measured in interleaved rounds against the baseline (:func:`interleaved_times`) carries the
    median of its per-round time ratios as ``extra["vs_baseline_interleaved"]``; that is used instead.
    """
    times = [r.median_ms for r in rows if r.role == BASELINE and r.comparable and r.status == "ok" and r.median_ms]
    if not times:
        return
    fastest = min(times)
    for r in rows:
        if r.median_ms and (r.status == "ok" or r.status.startswith("MISMATCH")):
            r.vs_fastest_baseline = r.extra.get("vs_baseline_interleaved", r.median_ms / fastest)


def end_scenario(ctx: Context) -> None:
    """Drop what a scenario's cases shared (models in ``ctx.cache``, temporary checkpoints)."""
    ctx.cache.clear()
    ctx.resources.close()
    ctx.resources = contextlib.ExitStack()
    free_memory(ctx.device)


def run_case(case: Case, ctx: Context) -> list[Row]:
    """All implementations of one case, side by side, in this process."""
    torch.manual_seed(0)
    try:
        specs = case.make_impls(ctx)
    except Unavailable as exc:
        row = Row(
            scenario=case.scenario,
            group=case.group,
            x_name=case.x_name,
            x=case.x,
            impl="(case)",
            role=BASELINE,
            status=str(exc),
            metric=case.metric,
        )
        return [row]
    from .interleaved import run_interleaved, set_target

    if case.interleaved:
        return run_interleaved(case, specs, ctx)
    rows = [run_impl(case, spec, ctx) for spec in specs]
    del specs
    free_memory(ctx.device)
    set_ratios(rows)
    set_target(rows, case)
    return rows
