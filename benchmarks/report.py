"""Outputs of ``fastpeft bench``: the terminal table, JSON files, PNG plots and ``RESULTS.md``.

``RESULTS.md`` is rendered from the JSON files in ``benchmarks/results/`` and nothing else, so it
is never edited by hand: every GPU run recorded there stays, with its date, device and versions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SCHEMA = 1
RESULTS_HEADER = "# fastpeft benchmark results"
TABLE_COLUMNS = (
    "case",
    "implementation",
    "median",
    "rate",
    "vs fastest baseline",
    "vs floor",
    "peak memory",
    "rel. error",
    "status",
)


# ---------------------------------------------------------------------------------------------
# formatting


def fmt_time(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.1f} µs"
    return f"{ms:.2f} ms" if ms < 1000 else f"{ms / 1e3:.2f} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def fmt_rate(row: dict[str, Any]) -> str:
    value = row.get("tflops") if row.get("metric") == "TFLOP/s" else row.get("gbps")
    text = "-" if value is None else f"{value:.3g} {row.get('metric')}"
    tokens = (row.get("extra") or {}).get("tokens_per_s")
    return text if tokens is None else f"{text}, {tokens:,.0f} tok/s"


def row_cells(row: dict[str, Any]) -> list[str]:
    err = row.get("rel_err")
    return [
        f"{row['group']} {row['x_name']}={row['x']}",
        row["impl"],
        fmt_time(row.get("median_ms")),
        fmt_rate(row),
        fmt_ratio(row.get("vs_fastest_baseline")),
        fmt_ratio(row.get("vs_floor")),
        fmt_bytes(row.get("peak_mem_bytes")),
        "-" if err is None else f"{err:.1e}",
        row["status"],
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, one block per scenario."""
    blocks = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        cells = [list(TABLE_COLUMNS)] + [row_cells(r) for r in rows if r["scenario"] == scenario]
        widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
        lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(widths))).rstrip() for c in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append(f"== {scenario} ==\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


INTERLEAVED_COLUMNS = (
    "case",
    "implementation",
    "median",
    "rate",
    "speedup vs baseline (median of rounds)",
    "target",
    "met",
    "peak memory",
    "rel. error",
    "status",
)


def fmt_target(target: Sequence[Any] | None) -> str:
    if not target:
        return ""
    kind, value = target
    return f"≥ {value:g}× faster" if kind == "speedup" else f"≤ {value:g}× the time"


def interleaved_cells(row: dict[str, Any]) -> list[str]:
    """Cells of a row timed in interleaved rounds (benchmarks/interleaved.py): speedup and target."""
    extra = row.get("extra") or {}
    speedup = extra.get("speedup")
    base = extra.get("baseline")
    pairs = extra.get("pairs")  # ratios of pairs of rounds (benchmarks/interleaved.py), else of rounds
    counted = f"{pairs} pairs of {extra.get('rounds')} rounds" if pairs else f"{extra.get('rounds')} rounds"
    speed = "-" if speedup is None else f"{speedup:.2f}× ({counted})"
    if speedup is not None and base and base != row["impl"]:
        speed += f" vs {base}"
    met = {True: "yes", False: "**no**"}.get(extra.get("target_met"), "")
    cells = row_cells(row)
    return [*cells[:4], speed, fmt_target(extra.get("target")), met, *cells[6:]]


def interleaved_markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(INTERLEAVED_COLUMNS) + " |", "|" + "---|" * len(INTERLEAVED_COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in interleaved_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# JSON


def result_stem(result: dict[str, Any]) -> str:
    """File name stem: device type and name, then the UTC date-time (sorts by date per device)."""
    device = re.sub(r"[^a-z0-9]+", "-", f"{result['device']['type']}-{result['device']['name']}".lower()).strip("-")
    stamp = re.sub(r"[^0-9T]", "", result["date"].split("+")[0].split(".")[0])
    return f"{device}-{stamp}Z"


def write_json(result: dict[str, Any], directory: Path, stem: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path


def load_results(directory: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable result in ``directory`` (newest first) and one line per file that was skipped."""
    results, skipped = [], []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            if data.get("schema") != SCHEMA or "rows" not in data:
                raise ValueError(f"not a schema-{SCHEMA} benchmark result")
        except (OSError, ValueError) as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        data["_path"] = str(path)
        results.append(data)
    results.sort(key=lambda r: r.get("date", ""), reverse=True)
    return results, skipped


# ---------------------------------------------------------------------------------------------
# plots


def plot_result(result: dict[str, Any], directory: Path, stem: str) -> list[Path]:
    """One PNG per scenario: median time vs its x (M, T, seq, N) per implementation, and memory bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    paths = []
    for scenario in dict.fromkeys(r["scenario"] for r in result["rows"]):
        # memory-only rows (the ledger: no time) still get their memory bars
        rows = [
            r for r in result["rows"] if r["scenario"] == scenario and (r.get("median_ms") or r.get("peak_mem_bytes"))
        ]
        if not rows:
            continue
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        groups = list(dict.fromkeys(r["group"] for r in rows))
        color = {impl: plt.cm.tab10(i % 10) for i, impl in enumerate(impls)}  # one colour per implementation
        styles = ("-", "--", ":", "-.")  # one line style per shape group
        for group, impl in dict.fromkeys((r["group"], r["impl"]) for r in rows):
            pts = sorted(
                (r["x"], r["median_ms"])
                for r in rows
                if (r["group"], r["impl"]) == (group, impl) and r.get("median_ms")
            )
            ax_time.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                color=color[impl],
                linestyle=styles[groups.index(group) % len(styles)],
                label=f"{impl} [{group}]",
            )
        ax_time.set(xlabel=rows[0]["x_name"], ylabel="median time (ms)", title=f"{scenario}: time", yscale="log")
        ax_time.legend(fontsize=6)
        with_mem = [r for r in rows if r.get("peak_mem_bytes") is not None]
        ax_mem.barh(
            range(len(with_mem)),
            [r["peak_mem_bytes"] / 2**20 for r in with_mem],
            color=[color[r["impl"]] for r in with_mem],
        )  # same colours as the time plot
        ax_mem.set_yticks(range(len(with_mem)), [f"{r['group']} {r['x_name']}={r['x']}" for r in with_mem], fontsize=6)
        ax_mem.legend(handles=[Patch(color=color[i], label=i) for i in impls], fontsize=6)
        kind = with_mem[0]["mem_kind"] if with_mem else ""
        ax_mem.set(xlabel=f"peak memory (MiB, {kind})", title=f"{scenario}: memory")
        fig.suptitle(f"{result['device']['name']} · {result['date'][:10]}", fontsize=9)
        # fixed margins: tight_layout would cost ~0.5 s per figure measuring every label
        fig.subplots_adjust(left=0.06, right=0.99, bottom=0.11, top=0.88, wspace=0.38)
        path = directory / f"{stem}-{scenario}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# RESULTS.md


def _versions_line(result: dict[str, Any]) -> str:
    parts = [f"{k} {v}" for k, v in result.get("versions", {}).items()]
    git = result.get("git", {})
    commit = f"commit {git.get('commit', 'unknown')[:10]}" + (" (uncommitted changes)" if git.get("dirty") else "")
    floors = result.get("floors")
    floor = (
        "floors: copy {:.0f} GB/s, bf16 GEMM {:.0f} TFLOP/s".format(floors["copy_GBps"], floors["gemm_TFLOPs"])
        if floors
        else "floors: n/a (no GPU)"
    )
    return " · ".join([commit, *parts, floor])


def render_results_md(
    results: Iterable[dict[str, Any]],
    md_dir: Path,
    ledger: dict[str, Any] | None = None,
    recipe_ledger: dict[str, Any] | None = None,
) -> str:
    """The whole RESULTS.md text for ``results`` (newest first); plots linked relative to ``md_dir``;
    ``ledger``: the memory-ledger section's data (``ledger_report``), rendered first, then
    ``recipe_ledger`` (``recipe_ledger_report``: the GRPO / DPO recipes)."""
    results = list(results)
    lines = [
        RESULTS_HEADER,
        "",
        "_Generated by `fastpeft bench` from `benchmarks/results/*.json`; do not edit by hand "
        "(rerun `fastpeft bench --regenerate`)._",
        "",
    ]
    if ledger is not None:
        from .ledger_report import render

        lines += [render(ledger), ""]
    if recipe_ledger is not None:
        from .recipe_ledger_report import render as render_recipes

        lines += [render_recipes(recipe_ledger), ""]
    if not any(r["device"]["type"] == "cuda" for r in results):
        lines += ["**No GPU run has been recorded yet.**", ""]
    lines += [
        "Columns: median time; TFLOP/s or GB/s from the formulas in `benchmarks/formulas.py`; "
        "time ÷ fastest comparable baseline (< 1 is faster); time ÷ hardware floor (≥ 1); peak "
        "memory; relative error against a float64 reference at the same shapes.",
        "",
    ]
    gpu = [r for r in results if r["device"]["type"] == "cuda"]
    cpu = [r for r in results if r["device"]["type"] != "cuda"]
    if gpu and cpu:
        lines += ["## GPU runs", ""]
    lines += _result_sections(gpu, md_dir)
    if cpu:
        lines += [
            "## CPU runs",
            "",
            "This project's shared 2-core CPU machine. Cases marked as interleaved time their "
            "implementations in rounds whose order flips every other round; their speedup is the median "
            "over pairs of rounds of (baseline time ÷ ours) within a round, so load from other work on "
            "the machine cancels out (benchmarks/interleaved.py). Targets are issue 17's.",
            "",
        ]
        lines += _result_sections(cpu, md_dir)
    return "\n".join(lines).rstrip() + "\n"


def _result_sections(results: Sequence[dict[str, Any]], md_dir: Path) -> list[str]:
    lines: list[str] = []
    for result in results:
        lines += [
            f"### {result['date'][:16].replace('T', ' ')} UTC · {result['device']['name']} "
            f"({result['device']['type']}{', small shapes' if result.get('small') else ''})",
            "",
            _versions_line(result),
            "",
            f"`{result.get('command', 'fastpeft bench')}`",
            "",
        ]
        for scenario in dict.fromkeys(r["scenario"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["scenario"] == scenario]
            interleaved = any("rounds" in (r.get("extra") or {}) for r in rows)
            table = interleaved_markdown_table(rows) if interleaved else markdown_table(rows)
            lines += [f"#### {scenario}", "", table, ""]
            source = Path(result.get("_path", md_dir / "results" / "x.json")).parent
            for name in result.get("plots", []):
                if name.endswith(f"-{scenario}.png"):
                    lines += [f"![{scenario}]({Path(os.path.relpath(source / name, md_dir)).as_posix()})", ""]
    return lines


def write_results_md(results_dir: Path, md_path: Path) -> tuple[Path, list[str]]:
    """Regenerate ``md_path`` from every result JSON in ``results_dir``; returns it and skipped files."""
    from . import recipe_ledger_report
    from .ledger_report import load

    results, skipped = load_results(results_dir)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(
        render_results_md(results, md_path.parent, load(results_dir), recipe_ledger_report.load(results_dir))
    )
    return md_path, skipped
