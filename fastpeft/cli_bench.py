"""``fastpeft bench [SCENARIO ...]``: our kernels and workloads side by side with today's baselines.

The harness lives in the repository's ``benchmarks/`` folder (next to the ``fastpeft`` package in a
source checkout; it is not installed with the package). It is imported from there as
``fastpeft_benchmarks``; without a checkout the command says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path
from types import ModuleType

import fastpeft

PACKAGE_NAME = "fastpeft_benchmarks"


def benchmarks_dir() -> Path:
    """``<repository>/benchmarks``, located relative to the fastpeft package."""
    if fastpeft.__file__ is not None:
        return Path(fastpeft.__file__).resolve().parents[1] / "benchmarks"
    # some editable installs import fastpeft as a namespace package (no __file__): use its folder
    folders = [Path(p) for p in getattr(fastpeft, "__path__", []) if (Path(p) / "__init__.py").is_file()]
    if not folders:
        raise FileNotFoundError("cannot tell where the fastpeft package lives (no __file__, no __path__ folder)")
    return folders[0].resolve().parent / "benchmarks"


def load_benchmarks(directory: Path | None = None) -> ModuleType:
    """Import the benchmarks folder as the package ``fastpeft_benchmarks`` (once per process).

    Raises FileNotFoundError naming the folder looked at when it is not there.
    """
    directory = Path(directory) if directory is not None else benchmarks_dir()
    init = directory / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(
            f"the benchmark harness was not found at {directory} (no __init__.py there); `fastpeft bench` "
            "runs from a source checkout of fastpeft (git clone, then pip install -e .)"
        )
    if PACKAGE_NAME in sys.modules:
        return sys.modules[PACKAGE_NAME]
    spec = importlib.util.spec_from_file_location(PACKAGE_NAME, init, submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE_NAME]
        raise
    return module


def _parser(scenario_names: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastpeft bench",
        description="Run benchmark scenarios side by side with the installed baselines; print a table, "
        "write JSON and PNG plots, and (GPU runs) regenerate benchmarks/RESULTS.md.",
        epilog=f"scenarios: {', '.join(scenario_names)}",
    )
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="scenarios to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", default=None, help="tiny shapes (default without a GPU)")
    size.add_argument("--full", dest="small", action="store_false", help="the real shapes, even on CPU")
    p.add_argument("--filter", metavar="TEXT", help="only cases whose label contains TEXT (e.g. '8B', 'M=1')")
    p.add_argument("--out", type=Path, help="folder for JSON + PNG of unrecorded runs (default: a temp folder)")
    p.add_argument("--results-dir", type=Path, help="folder of recorded JSON (default: benchmarks/results)")
    p.add_argument("--results-md", type=Path, help="RESULTS.md to regenerate (default: benchmarks/RESULTS.md)")
    rec = p.add_mutually_exclusive_group()
    rec.add_argument("--record-cpu", action="store_true", help="record a CPU run in the results and RESULTS.md")
    rec.add_argument("--no-record", action="store_true", help="do not record even a GPU run")
    p.add_argument("--regenerate", action="store_true", help="only rebuild RESULTS.md from the recorded JSON")
    p.add_argument("--ledger", action="store_true", help="measure the memory-ledger section of RESULTS.md (fake "
                   "tensors, any device; with --small a tiny config, printed and not recorded)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--reps", type=int, default=5, help="timed runs per measurement on CPU (default 5)")
    p.add_argument("--strict", action="store_true", help="stop at the first implementation error")
    return p


def main(argv: list[str]) -> int:
    try:
        bench = load_benchmarks()
        from fastpeft_benchmarks import report, runner, scenarios
    except FileNotFoundError as exc:
        print(f"fastpeft bench: {exc}", file=sys.stderr)
        return 2
    args = _parser(list(scenarios.SCENARIOS)).parse_args(argv)
    results_dir = args.results_dir or runner.RESULTS_DIR
    results_md = args.results_md or runner.RESULTS_MD
    if args.list:
        for name in scenarios.SCENARIOS:
            print(f"{name:<18} {scenarios.resolve([name])[0].TITLE}")
        return 0
    if args.ledger:
        return _ledger(bench, args, results_dir, results_md, argv)
    if args.regenerate:
        path, skipped = report.write_results_md(results_dir, results_md)
        for line in skipped:
            print(f"fastpeft bench: skipped {line}", file=sys.stderr)
        print(f"regenerated {path}")
        return 0
    try:
        scenarios.resolve(args.scenarios)
    except scenarios.UnknownScenario as exc:
        print(f"fastpeft bench: {exc}", file=sys.stderr)
        return 2
    if args.small is None and args.device != "cuda" and not _cuda_available():
        print("fastpeft bench: no CUDA device, so tiny --small shapes (pass --full for the real ones)")
    try:
        bench.runner.run_bench(
            args.scenarios, device=args.device, small=args.small, out_dir=args.out, results_dir=results_dir,
            results_md=results_md, record=False if args.no_record else None, record_cpu=args.record_cpu,
            plots=not args.no_plots, strict=args.strict, case_filter=args.filter, cpu_reps=args.reps,
            command=shlex.join(["fastpeft", "bench", *argv]),
        )  # fmt: skip
    except ValueError as exc:
        print(f"fastpeft bench: {exc}", file=sys.stderr)
        return 2
    return 0


def _ledger(bench: ModuleType, args: argparse.Namespace, results_dir: Path, results_md: Path, argv: list[str]) -> int:
    from fastpeft_benchmarks import ledger_report, report

    data = ledger_report.measure(small=bool(args.small), log=lambda s: print(s, file=sys.stderr))
    command = shlex.join(["fastpeft", "bench", *argv])
    if args.small:  # a smoke run: printed, written only to --out
        if args.out:
            ledger_report.write(data, args.out, command)
        print(ledger_report.render({**data, "command": command}))
        return 0
    print(f"wrote {ledger_report.write(data, results_dir, command)}")
    path, _ = report.write_results_md(results_dir, results_md)
    print(f"regenerated {path}")
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
