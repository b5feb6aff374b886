"""One ``fastpeft bench`` run: scenarios side by side in this process, then table, JSON, plots, RESULTS.md.

Where results go:
- a GPU run is recorded: its JSON and PNGs go to ``results_dir`` (``benchmarks/results/``) and
  ``RESULTS.md`` is regenerated from every JSON there (earlier GPU runs keep their dates);
- a CPU run is not recorded unless ``record_cpu``: its JSON and PNGs go to ``out_dir`` (a fresh
  temporary folder by default) and ``RESULTS.md`` is left alone;
- ``record=False`` never records (exploratory GPU runs).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import report, scenarios
from .harness import Context, end_scenario, measure_floors, run_case

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
VERSIONED = ("torch", "triton", "transformers", "bitsandbytes", "peft")


@dataclasses.dataclass
class BenchRun:
    result: dict[str, Any]
    json_path: Path
    plots: list[Path]
    results_md: Path | None  # set when RESULTS.md was regenerated
    table: str


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["torch"] = torch.__version__  # carries the CUDA build tag (+cu130)
    return out


def git_info(repo: Path = BENCH_DIR.parent) -> dict[str, Any]:
    """Commit and whether the tree has uncommitted changes (read-only git; "unknown" outside a checkout)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            != ""
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": device.type, "name": f"{platform.machine()} CPU ({torch.get_num_threads()} threads)"}


def run_bench(
    names: Sequence[str] | None = None,
    *,
    device: str | torch.device | None = None,
    small: bool | None = None,
    out_dir: Path | None = None,
    results_dir: Path = RESULTS_DIR,
    results_md: Path = RESULTS_MD,
    record: bool | None = None,
    record_cpu: bool = False,
    plots: bool = True,
    strict: bool = False,
    case_filter: str | None = None,
    cpu_reps: int = 5,
    command: str = "fastpeft bench",
    log: Callable[[str], None] = print,
) -> BenchRun:
    """Run ``names`` (all scenarios when empty); see the module docstring for where outputs go.

    Raises ``scenarios.UnknownScenario`` (a ValueError) before measuring anything if a name is wrong.
    """
    modules = scenarios.resolve(names)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    small = device.type != "cuda" if small is None else small
    ctx = Context(device=device, small=small, strict=strict, cpu_reps=cpu_reps, log=log)
    log(
        f"fastpeft bench on {device_info(device)['name']}: {', '.join(m.NAME for m in modules)}"
        f"{' (small shapes)' if small else ''}"
    )
    ctx.floors = measure_floors(device)
    rows = []
    for module in modules:
        for case in module.cases(small):
            if case_filter and case_filter not in f"{case.scenario} {case.label}":
                continue
            log(f"  {module.NAME}: {case.label}")
            rows += [r.to_json() for r in run_case(case, ctx)]
        end_scenario(ctx)
    result = {
        "schema": report.SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": versions(),
        "git": git_info(),
        "python": sys.version.split()[0],
        "small": small,
        "floors": ctx.floors,
        "scenarios": [m.NAME for m in modules],
        "command": command,
        "rows": rows,
    }
    recorded = record is not False and (device.type == "cuda" or record_cpu)
    target = Path(results_dir) if recorded else Path(out_dir or tempfile.mkdtemp(prefix="fastpeft-bench-"))
    target.mkdir(parents=True, exist_ok=True)
    stem = report.result_stem(result)
    pngs = report.plot_result(result, target, stem) if plots and rows else []
    result["plots"] = [p.name for p in pngs]
    json_path = report.write_json(result, target, stem)
    md = None
    if recorded:
        md, skipped = report.write_results_md(Path(results_dir), Path(results_md))
        for line in skipped:
            log(f"RESULTS.md: skipped {line}")
    table = report.format_table(rows)
    log("\n" + table + "\n")
    log(f"JSON: {json_path}" + (f"\nplots: {', '.join(str(p) for p in pngs)}" if pngs else ""))
    log(
        f"RESULTS.md regenerated: {md}"
        if md
        else "RESULTS.md not updated (CPU runs are recorded only with --record-cpu)"
        if device.type != "cuda"
        else "RESULTS.md not updated (--no-record)"
    )
    return BenchRun(result=result, json_path=json_path, plots=pngs, results_md=md, table=table)
