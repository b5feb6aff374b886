"""Interleaved timing for machines shared with other work (this project's CPU runs).

Timing implementation A for a while and then B measures B under whatever load the machine had by
then; on a shared 2-core machine that alone moves a ratio by 2x. Here every implementation of a case
is built first and warmed up (that call's time sets how many calls a round makes), then timed in
rounds — one call of each per round (a short call repeated until the round lasts ``ROUND_MIN_MS``),
the order rotating, the last round also measuring peak memory — and the
ratio that is reported is the median over rounds of (ours / baseline) in the same round, which a
load that drifts slowly cancels out of. Each row also keeps its own median time.

Rows: ``vs_fastest_baseline`` = median round ratio to the baseline with the smallest median;
``extra["speedup"]`` = its inverse; ``extra["round_ratios"]`` all of them; with a case ``target``,
``extra["target"]`` and ``extra["target_met"]``.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from typing import Any

from .harness import BASELINE, OURS, Case, Context, ImplSpec, Measured, Row, Unavailable, _base_row, _check, _fill_rates
from .harness import PeakMemory, free_memory, synchronize

INTERLEAVED_ROUNDS = 5


def _error_status(exc: Exception, ctx: Context) -> str:
    if ctx.strict:
        raise exc
    traceback.print_exc(file=sys.stderr)
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


ROUND_MIN_MS = 20.0  # a round repeats a short call until it lasts this long: one preemption is a small share


def _timed(run: Any, ctx: Context, calls: int = 1) -> float:
    """Milliseconds per call of ``run`` over ``calls`` back-to-back calls."""
    synchronize(ctx.device)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    synchronize(ctx.device)
    return (time.perf_counter() - start) * 1e3 / calls


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
    times: dict[str, list[float]] = {name: [] for name in runs}
    n_rounds = max(ctx.cpu_reps, 1)
    names = list(runs)
    peaks: dict[str, int | None] = {}
    for r in range(n_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)] if names else []:
            try:
                if r == n_rounds - 1:  # the last round also records peak memory (no extra call)
                    with PeakMemory(ctx.device) as window:
                        times[name].append(_timed(runs[name].run, ctx, calls[name]))
                    peaks[name] = window.peak
                else:
                    times[name].append(_timed(runs[name].run, ctx, calls[name]))
            except Exception as exc:
                next(row for row in rows if row.impl == name).status = _error_status(exc, ctx)
                times[name] = []
                names.remove(name)
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
        ratios = [t / b for t, b in zip(times[row.impl], base)]
        row.vs_fastest_baseline = statistics.median(ratios)
        row.extra.update(speedup=1.0 / row.vs_fastest_baseline, round_ratios=ratios, baseline=fastest.impl,
                         rounds=len(ratios))  # fmt: skip
    set_target(rows, case)


def set_target(rows: list[Row], case: Case) -> None:
    """Record the case's target and whether each of our rows meets it (from ``vs_fastest_baseline``)."""
    if case.target is None:
        return
    for row in rows:
        if row.role == OURS and row.vs_fastest_baseline is not None:
            row.extra.update(target=list(case.target), target_met=target_met(case.target, row.vs_fastest_baseline))
