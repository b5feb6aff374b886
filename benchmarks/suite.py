"""Shared by the pytest-benchmark suites (``benchmarks/test_bench_*.py``).

Every scenario case becomes (case, implementation) parameters: the tiny ``small`` cases run on CPU
in CI (``--benchmark-disable`` there: the suites check that each implementation builds, runs and
matches its float64 reference, not how fast it is); the real shapes run on CUDA, marked ``gpu``.
An implementation that is not installed or not built yet is skipped with that reason.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import torch

from .harness import Context, Measured, Prepared, Unavailable, end_scenario, relative_error

NO_CUDA = not torch.cuda.is_available()


def params(module: ModuleType, gpu_marks: tuple[Any, ...] = ()) -> list[Any]:
    """``pytest.param(case, impl_name, device)``: on CPU the smallest small case of each group (CI
    checks that everything runs; ``fastpeft bench --small`` covers the rest), on CUDA every real case."""
    out = []
    small = module.cases(small=True)
    small_cases = [c for c in small if c.x == min(o.x for o in small if o.group == c.group)]
    for case in small_cases:
        for impl in module.IMPL_NAMES:
            out.append(pytest.param(case, impl, "cpu", id=f"cpu-{case.label}-{impl}"))
    gpu = (pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device"), *gpu_marks)
    for case in module.cases(small=False):
        for impl in module.IMPL_NAMES:
            out.append(pytest.param(case, impl, "cuda", id=f"gpu-{case.label}-{impl}", marks=gpu))
    return out


def _synchronized(fn: Any, device: torch.device) -> Any:
    if device.type != "cuda":
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def run_param(benchmark: Any, case: Any, impl_name: str, device: str) -> None:
    """Build one implementation of one case, check it against its reference, and benchmark it."""
    ctx = Context(device=torch.device(device), small=device == "cpu", cpu_warmup=0, cpu_reps=1, strict=True)
    try:
        _run_param(benchmark, case, impl_name, ctx)
    finally:
        end_scenario(ctx)  # deletes temporary checkpoints


def _run_param(benchmark: Any, case: Any, impl_name: str, ctx: Context) -> None:
    specs = {spec.name: spec for spec in case.make_impls(ctx)}
    spec = specs[impl_name]
    if case.self_timed:  # whole workloads time themselves; the benchmark times the lot (model build included)
        try:
            measured = benchmark.pedantic(spec.build, rounds=1, iterations=1)
        except Unavailable as exc:
            pytest.skip(str(exc))
        assert isinstance(measured, Measured)
        assert measured.median_ms > 0 and measured.extra["tokens_per_s"] > 0
        benchmark.extra_info.update(median_ms=measured.median_ms, **measured.extra)
        return
    try:
        prepared = spec.build()
    except Unavailable as exc:
        pytest.skip(str(exc))
    assert isinstance(prepared, Prepared)
    if prepared.reference is not None:
        got = prepared.run()
        got = (got,) if isinstance(got, torch.Tensor) else tuple(got)
        err = relative_error(got, tuple(prepared.reference()))
        assert err <= case.tolerance, f"{impl_name} on {case.label}: relative error {err:.2e} > {case.tolerance}"
        benchmark.extra_info["rel_err"] = err
    out = benchmark(_synchronized(prepared.run, ctx.device))
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    assert all(bool(torch.isfinite(o).all()) for o in outs)
