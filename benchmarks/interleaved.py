"""Interleaved timing for machines shared with other work (this project's CPU runs).

Timing implementation A for a while and then B measures B under whatever load the machine had by
then; on a shared 2-core machine that alone moves a ratio by 2x. Here every implementation of a case
is built first and warmed up (that call's time sets how many calls a turn makes: a short call is
repeated until a turn lasts ``ROUND_MIN_MS``), then timed in rounds by
:func:`~fastpeft_benchmarks.harness.interleaved_times` (one turn of each per round, the order
reversed every other round, the last round also measuring peak memory). The reported ratio is the
median of :func:`~fastpeft_benchmarks.harness.paired_round_ratios` (ours / baseline within a
round, each pair of rounds having both orders), which a load that drifts slowly cancels out of.
Each row also keeps its own median time.

Rows: ``vs_fastest_baseline`` = median paired-round ratio to the baseline with the smallest median;
``extra["speedup"]`` = its inverse; ``extra["round_ratios"]`` all of them (``extra["pairs"]`` of
``extra["rounds"]``); with a case ``target``,
``extra["target"]`` and ``extra["target_met"]``.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

from .harness import (
    BASELINE,
    OURS,
    Case,
    Context,
    ImplSpec,
    Measured,
    PeakMemory,
    Row,
    Unavailable,
    _base_row,
    _check,
    _fill_rates,
    free_memory,
    interleaved_times,
    paired_round_ratios,
    synchronize,
)

INTERLEAVED_ROUNDS = 5


def _error_status(exc: Exception, ctx: Context) -> str:
    if ctx.strict:
        raise exc
    traceback.print_exc(file=sys.stderr)
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


ROUND_MIN_MS = 20.0  # a turn repeats a short call until it lasts this long: one preemption is a small share


def _timed(run: Any, ctx: Context) -> float:
    """Milliseconds of one call of ``run`` (the warm-up)."""
    synchronize(ctx.device)
    start = time.perf_counter()
    run()
    synchronize(ctx.device)
    return (time.perf_counter() - start) * 1e3


def _calls_per_round(once_ms: float) -> int:
    return max(1, min(1000, int(ROUND_MIN_MS / max(once_ms, 1e-3))))


def target_met(target: tuple[str, float] | None, ratio: float | None) -> bool | None:
    """Whether a time ratio (ours / baseline) meets ``target`` (None when either is missing)."""
    if target is None or ratio is None:
        return None
    kind, value = target
    if kind == "speedup":
        return 1.0 / ratio >= value
    if kind == "time_ratio":
        return ratio <= value
    raise ValueError(f"unknown target kind {kind!r}; expected 'speedup' or 'time_ratio'")


def run_interleaved(case: Case, specs: list[ImplSpec], ctx: Context) -> list[Row]:
    """Build, check, warm up, then time every implementation of ``case`` in alternating rounds."""
    rows, runs, calls = [], {}, {}
    for spec in specs:
        row = _base_row(case, spec, ctx)
        rows.append(row)
        try:
            built = spec.build()
            if isinstance(built, Measured):
                raise TypeError("interleaved cases take Prepared implementations (the harness times them)")
            row.backend = built.backend
            row.bytes = row.bytes if built.bytes is None else built.bytes
            row.flops = row.flops if built.flops is None else built.flops
            _check(row, built)
            warm = [_timed(built.run, ctx) for _ in range(max(1, ctx.cpu_warmup))]
            runs[spec.name] = built
            calls[spec.name] = _calls_per_round(warm[-1])
        except Unavailable as exc:
            row.status = str(exc)
        except Exception as exc:  # one broken implementation must not cost the rest
            row.status = _error_status(exc, ctx)
    peaks: dict[str, int | None] = {}
    failed: dict[str, Exception] = {}

    def turn(name: str) -> Any:
        def call() -> None:
            if name not in failed:  # one that fails is skipped from then on
                try:
                    runs[name].run()
                except Exception as exc:
                    failed[name] = exc

        return call

    @contextlib.contextmanager
    def peak_memory(name: str) -> Iterator[None]:
        with PeakMemory(ctx.device) as window:
            yield
        peaks[name] = window.peak

    times = interleaved_times(
        {name: turn(name) for name in runs}, 0, max(ctx.cpu_reps, 1), ctx.device, calls, peak_memory
    )
    times = {name: [t * 1e3 for t in ts] for name, ts in times.items()}  # ms per call
    for name, exc in failed.items():
        next(row for row in rows if row.impl == name).status = _error_status(exc, ctx)
    names = [name for name in runs if name not in failed]
    by_name = {row.impl: row for row in rows}
    for name in names:
        row = by_name[name]
        row.median_ms = statistics.median(times[name])
        transient = peaks.get(name)
        row.peak_mem_bytes = None if transient is None else transient + runs[name].resident_bytes
        _fill_rates(row)
    _set_round_ratios(rows, times, case)
    runs.clear()
    free_memory(ctx.device)
    return rows


def _set_round_ratios(rows: list[Row], times: dict[str, list[float]], case: Case) -> None:
    baselines = [r for r in rows if r.role == BASELINE and r.comparable and r.status == "ok" and r.median_ms]
    if not baselines:
        return
    fastest = min(baselines, key=lambda r: r.median_ms)
    base = times[fastest.impl]
    for row in rows:
        if not row.median_ms or not (row.status == "ok" or row.status.startswith("MISMATCH")):
            continue
        paired = paired_round_ratios(times[row.impl], base)
        ratios = paired or [t / b for t, b in zip(times[row.impl], base)]  # one round: its ratio
        row.vs_fastest_baseline = statistics.median(ratios)
        row.extra.update(
            speedup=1.0 / row.vs_fastest_baseline,
            round_ratios=ratios,
            baseline=fastest.impl,
            rounds=len(times[row.impl]),
            pairs=len(paired),
        )
    set_target(rows, case)


def set_target(rows: list[Row], case: Case) -> None:
    """Record the case's target and whether each of our rows meets it (from ``vs_fastest_baseline``)."""
    if case.target is None:
        return
    for row in rows:
        if row.role == OURS and row.vs_fastest_baseline is not None:
            row.extra.update(target=list(case.target), target_met=target_met(case.target, row.vs_fastest_baseline))
