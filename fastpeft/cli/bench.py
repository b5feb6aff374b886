"""``fastpeft bench [SCENARIO ...]``: our kernels and workloads side by side with today's baselines.

The harness lives in the repository's ``benchmarks/`` folder (next to the ``fastpeft`` package in a
source checkout; it is not installed with the package). It is imported from there as
``fastpeft_benchmarks``; without a checkout the command says so and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Literal

import fastpeft
from fastpeft.cli.common import config_help, run_cli
from fastpeft.training.config_io import ConfigError, parse_cli

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


@dataclasses.dataclass
class BenchConfig:
    scenarios: list[str] = dataclasses.field(default_factory=list)  # positional; default: all
    list_scenarios: bool = False  # --list: list the scenarios and exit
    device: Literal["cuda", "cpu"] | None = None  # default: cuda when available
    small: bool | None = None  # tiny shapes (default without a GPU); --full: the real shapes, even on CPU
    filter: str | None = None  # only cases whose label contains this text (e.g. '8B', 'M=1')
    out: str | None = None  # folder for JSON + PNG of unrecorded runs (default: a temp folder)
    results_dir: str | None = None  # folder of recorded JSON (default: benchmarks/results)
    results_md: str | None = None  # RESULTS.md to regenerate (default: benchmarks/RESULTS.md)
    record_cpu: bool = False  # record a CPU run in the results and RESULTS.md
    no_record: bool = False  # do not record even a GPU run
    regenerate: bool = False  # only rebuild RESULTS.md from the recorded JSON
    ledger: bool = False  # measure RESULTS.md's memory-ledger section (any device); --small: tiny, not recorded
    ledger_recipes: bool = False  # the same for the GRPO / DPO recipes' section
    no_plots: bool = False  # skip the PNG plots
    reps: int = 5  # timed runs per measurement on CPU
    strict: bool = False  # stop at the first implementation error


_ALIASES = {"list": "list_scenarios", "full": ("small", False)}
SUMMARY = (
    "Run benchmark scenarios side by side with the installed baselines; print a table, write JSON and "
    "PNG plots, and (GPU runs) regenerate benchmarks/RESULTS.md."
)


def _body(argv: list[str]) -> int:
    bench = load_benchmarks()  # FileNotFoundError without a source checkout: one line, status 2
    from fastpeft_benchmarks import report, runner, scenarios

    args = parse_cli(BenchConfig, argv, positional="scenarios", aliases=_ALIASES)
    if args.record_cpu and args.no_record:
        raise ConfigError("--record-cpu and --no-record exclude each other")
    results_dir = Path(args.results_dir) if args.results_dir else runner.RESULTS_DIR
    results_md = Path(args.results_md) if args.results_md else runner.RESULTS_MD
    if args.list_scenarios:
        for name in scenarios.SCENARIOS:
            print(f"{name:<18} {scenarios.resolve([name])[0].TITLE}")
        return 0
    if args.ledger and args.ledger_recipes:
        raise ConfigError("--ledger and --ledger-recipes are two runs: pass one")
    if args.ledger or args.ledger_recipes:
        return _ledger(args, results_dir, results_md, argv)
    if args.regenerate:
        path, skipped = report.write_results_md(results_dir, results_md)
        for line in skipped:
            print(f"fastpeft bench: skipped {line}", file=sys.stderr)
        print(f"regenerated {path}")
        return 0
    try:
        scenarios.resolve(args.scenarios)
    except scenarios.UnknownScenario as exc:
        raise ConfigError(str(exc)) from exc
    if args.small is None and args.device != "cuda" and not _cuda_available():
        print("fastpeft bench: no CUDA device, so tiny --small shapes (pass --full for the real ones)")
    bench.runner.run_bench(
        args.scenarios,
        device=args.device,
        small=args.small,
        out_dir=Path(args.out) if args.out else None,
        results_dir=results_dir,
        results_md=results_md,
        record=False if args.no_record else None,
        record_cpu=args.record_cpu,
        plots=not args.no_plots,
        strict=args.strict,
        case_filter=args.filter,
        cpu_reps=args.reps,
        command=shlex.join(["fastpeft", "bench", *argv]),
    )
    return 0


def _ledger(args: BenchConfig, results_dir: Path, results_md: Path, argv: list[str]) -> int:
    from fastpeft_benchmarks import ledger_report, recipe_ledger_report, report

    section = recipe_ledger_report if args.ledger_recipes else ledger_report  # the same measure / write / render
    data = section.measure(small=bool(args.small), log=lambda s: print(s, file=sys.stderr))
    command = shlex.join(["fastpeft", "bench", *argv])
    if args.small:  # a smoke run: printed, written only to --out
        if args.out:
            section.write(data, Path(args.out), command)
        print(section.render({**data, "command": command}))
        return 0
    print(f"wrote {section.write(data, results_dir, command)}")
    path, _ = report.write_results_md(results_dir, results_md)
    print(f"regenerated {path}")
    return 0


def _help() -> str:
    text = config_help(BenchConfig, "bench", SUMMARY, positional="SCENARIO ...")
    text += "\n  --list                    same as --list-scenarios\n  --full                    same as --small false"
    try:
        load_benchmarks()
        from fastpeft_benchmarks import scenarios

        text += f"\n\nscenarios: {', '.join(scenarios.SCENARIOS)}"
    except FileNotFoundError:
        pass
    return text


def main(argv: list[str]) -> int:
    return run_cli("bench", argv, _body, _help)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
