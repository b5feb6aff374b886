"""The memory-ledger section of RESULTS.md: targets, ledger tables side by side, what each piece saved.

``fastpeft bench --ledger`` measures (no GPU needed: every number is a training step run on fake
tensors by ``fastpeft.training.ledger_step``), writes ``results/ledger/memory-ledger.json`` and
regenerates RESULTS.md, which renders that JSON. ``--small`` runs the same code on a tiny config
(the CPU smoke run of ``gpu_check.sh``; never recorded in RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LEDGER_SCHEMA = "memory-ledger-1"
GiB = 2**30
CUDA_CONTEXT_GIB = 1.0
# (label, size, card GiB, goal tokens, reference) and (label, size, batch, seq, goal GiB, reference)
LONGEST = (
    ("longest context in 16 GiB", "8B", 16, 80_000, "unsloth 40,724; HF + FA2 2,551"),
    ("longest context in 24 GiB", "8B", 24, 160_000, "unsloth 78,475; HF + FA2 5,789"),
    ("longest context in 80 GiB", "8B", 80, 600_000, "unsloth 342,733"),
)
PEAKS = (
    ("peak at 8,192 tokens", "8B", 1, 8192, 8.0, "HF + bnb + PEFT measured 45.0 GiB"),
    ('"1.2B" config, batch 4 x 2048, peak', "1.2B", 4, 2048, 2.5, "HF + bnb + PEFT measured 6.65 GiB"),
)
SIDE_BY_SIDE = (("8B", 1, 2048), ("8B", 1, 8192), ("1.2B", 4, 2048))
PIECES_AT = ("8B", 1, 32768)
SMALL = {"size": "tiny", "cards": (1.004,), "peaks": (("tiny", 2, 64),), "pieces": ("tiny", 1, 256)}


def _config(size: str) -> dict[str, Any]:
    from .scenarios.memory import ledger_config

    return ledger_config(size)


def _designs() -> list[tuple[str, Any]]:
    from fastpeft.training.step_design import LONG_CONTEXT_TILE_ROWS, StepDesign

    return [
        ("fastpeft: transformers' checkpointing", StepDesign()),
        ("+ offloaded checkpointing", StepDesign(offload_activations=True)),
        ("+ tiled MLP", StepDesign(offload_activations=True, mlp_tile_rows=LONG_CONTEXT_TILE_ROWS)),
        ("+ lean RMSNorm (long-context design)", StepDesign.long_context()),
    ]


_STEPS: dict[tuple, dict[str, Any]] = {}


def _step(size: str, batch: int, seq: int, stack: str, design: Any) -> dict[str, Any]:
    """One ledger step as JSON (each distinct step is measured once per process)."""
    from fastpeft.training.ledger_step import LedgerSpec, measure_step

    key = (size, batch, seq, stack, repr(design))
    if key not in _STEPS:
        spec = LedgerSpec(_config(size), seq_len=seq, batch_size=batch, stack=stack, design=design)
        _STEPS[key] = measure_step(spec).to_json()
    return _STEPS[key]


def _longest(size: str, gib: float, stack: str, design: Any, log: Callable[[str], None]) -> dict[str, Any]:
    from fastpeft.training.plan_measure import measure_longest

    found = measure_longest(_config(size), "qlora", gib, CUDA_CONTEXT_GIB, design=design, stack=stack, log=log)
    return dataclasses.asdict(found)


def measure(small: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every number of the ledger section (minutes on a CPU at the real sizes; seconds with ``small``)."""
    from fastpeft.training.step_design import StepDesign

    long_context, default = StepDesign.long_context(), StepDesign()
    start = time.perf_counter()
    out: dict[str, Any] = {
        "schema": LEDGER_SCHEMA,
        "small": small,
        "cuda_context_gib": CUDA_CONTEXT_GIB,
        "design": long_context.label(),
        "longest": [],
        "peaks": [],
        "side_by_side": [],
        "pieces": [],
    }
    longest = [(f"longest context in {g:g} GiB", SMALL["size"], g, 0, "") for g in SMALL["cards"]] if small else LONGEST
    for label, size, gib, goal, reference in longest:
        log(f"ledger: {label} ({size})")
        ours = _longest(size, gib, "fastpeft", long_context, log)
        base = _longest(size, gib, "hf_peft", default, log)
        out["longest"].append(
            {
                "label": label,
                "size": size,
                "gib": gib,
                "goal_tokens": goal,
                "reference": reference,
                "fastpeft": ours,
                "hf_peft": base,
            }
        )
    peaks = [(f"peak at {b} x {s}", z, b, s, 1.0, "") for z, b, s in SMALL["peaks"]] if small else PEAKS
    for label, size, batch, seq, goal, reference in peaks:
        log(f"ledger: {label} ({size})")
        out["peaks"].append(
            {
                "label": label,
                "size": size,
                "batch": batch,
                "seq": seq,
                "goal_gib": goal,
                "reference": reference,
                "fastpeft": _step(size, batch, seq, "fastpeft", long_context),
                "fastpeft_default": _step(size, batch, seq, "fastpeft", default),
                "hf_peft": _step(size, batch, seq, "hf_peft", default),
            }
        )
    for size, batch, seq in SMALL["peaks"] if small else SIDE_BY_SIDE:
        log(f"ledger: side by side {size} {batch} x {seq}")
        columns = {
            "HF + bnb + PEFT": _step(size, batch, seq, "hf_peft", default),
            "fastpeft default": _step(size, batch, seq, "fastpeft", default),
            "fastpeft long-context": _step(size, batch, seq, "fastpeft", long_context),
        }
        out["side_by_side"].append({"size": size, "batch": batch, "seq": seq, "columns": columns})
    size, batch, seq = SMALL["pieces"] if small else PIECES_AT
    log(f"ledger: step-design pieces at {size} {batch} x {seq}")
    for label, design in _designs():
        out["pieces"].append(
            {
                "label": label,
                "size": size,
                "batch": batch,
                "seq": seq,
                "result": _step(size, batch, seq, "fastpeft", design),
            }
        )
    out["seconds"] = time.perf_counter() - start
    return out


def write(data: dict[str, Any], results_dir: Path, command: str) -> Path:
    from .runner import git_info, versions

    data = {
        **data,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "versions": versions(),
        "git": git_info(),
    }
    path = Path(results_dir) / "ledger" / "memory-ledger.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def load(results_dir: Path) -> dict[str, Any] | None:
    path = Path(results_dir) / "ledger" / "memory-ledger.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("schema") == LEDGER_SCHEMA and not data.get("small") else None


# ---------------------------------------------------------------------------------------------
# markdown


def _gib(n: float | None) -> str:
    from fastpeft.training.memory_ledger import format_gib

    return "-" if n is None else format_gib(n)


def _tokens(found: dict[str, Any]) -> str:
    if found["tokens"] == 0:
        return "does not fit"
    return f"{found['tokens']:,} tokens" + (" (the search's cap)" if found.get("capped") else "")


def render(data: dict[str, Any]) -> str:
    """The RESULTS.md section for ``data`` (from :func:`measure`, as written by :func:`write`)."""
    from fastpeft.training.memory_ledger import LedgerResult, format_ledger_table

    ctx = data["cuda_context_gib"]
    lines = [
        "## Memory ledger (device-independent: one training step on fake tensors)",
        "",
        f"`{data.get('command', 'fastpeft bench --ledger')}` · {data.get('date', '')[:16].replace('T', ' ')} UTC · "
        f"commit {data.get('git', {}).get('commit', 'unknown')[:10]} · "
        + " · ".join(f"{k} {v}" for k, v in data.get("versions", {}).items()),
        "",
        'Llama "8B" (hidden 4096, 32 layers, MLP 14336, 32/8 heads, vocab 128256) and "1.2B" (2048, 16, '
        "8192, 16/8, 32000) of `../shared/ANCHORS.md`; QLoRA r 16 on all seven projections, bf16, AdamW "
        f"(foreach) on the adapters, batch 1 unless stated. fastpeft: {data['design']}. Longest context: the "
        f"longest length whose measured peak fits the card minus {ctx:g} GiB for the CUDA context and the "
        "allocator (searched to 256 tokens: that length fits, 256 more do not); host RAM: the pinned memory the "
        "offloaded block inputs take there (layers × tokens × hidden × 2 bytes). The HF + bnb + PEFT column "
        "is the same ledger on the anchors' baseline (bitsandbytes stand-in: same NF4 bytes, same per-call "
        "dense dequantization); its measured peaks in ANCHORS.md are 1-18% higher.",
        "",
        "### Targets",
        "",
        "| target | goal | fastpeft (ledger) | reached | HF + bnb + PEFT (ledger) | for reference |",
        "|---|---|---|---|---|---|",
    ]
    for row in data["longest"]:
        ours = row["fastpeft"]
        ok = "yes" if ours["tokens"] >= row["goal_tokens"] else "**no**"
        host = f", host RAM {_gib(ours['host_peak_bytes'])}" if ours.get("host_peak_bytes") else ""
        lines.append(
            f"| {row['label']} | ≥ {row['goal_tokens']:,} tokens | {_tokens(ours)} (peak "
            f"{_gib(ours['peak_bytes'])}{host}) | {ok} | {_tokens(row['hf_peft'])} | {row['reference']} |"
        )
    for row in data["peaks"]:
        peak = row["fastpeft"]["peak_bytes"]
        ok = "yes" if peak <= row["goal_gib"] * GiB else "**no**"
        lines.append(
            f"| {row['label']} | ≤ {row['goal_gib']:g} GiB | {_gib(peak)} (default step "
            f"{_gib(row['fastpeft_default']['peak_bytes'])}) | {ok} | {_gib(row['hf_peft']['peak_bytes'])} | "
            f"{row['reference']} |"
        )
    lines += ["", "### fastpeft and HF + bnb + PEFT side by side (peak and its breakdown at the peak)", ""]
    for block in data["side_by_side"]:
        columns = {name: LedgerResult(**res) for name, res in block["columns"].items()}
        lines += [f'"{block["size"]}", {block["batch"]} x {block["seq"]} tokens:', "", format_ledger_table(columns), ""]
    first = data["pieces"][0]
    lines += [
        f"### What each piece of the step design saves ({first['size']}, {first['batch']} x {first['seq']} tokens)",
        "",
        "| step | peak (device) | saved vs the row above | offloaded to host |",
        "|---|---|---|---|",
    ]
    previous = None
    for piece in data["pieces"]:
        peak = piece["result"]["peak_bytes"]
        saved = "-" if previous is None else _gib(previous - peak)
        lines.append(f"| {piece['label']} | {_gib(peak)} | {saved} | {_gib(piece['result']['host_peak_bytes'])} |")
        previous = peak
    notes = dict.fromkeys(n for b in data["side_by_side"] for r in b["columns"].values() for n in r["notes"])
    lines += ["", *[f"- {n}" for n in notes], f"- measured in {data['seconds'] / 60:.0f} min on a CPU", ""]
    return "\n".join(lines)
