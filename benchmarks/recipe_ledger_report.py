"""The RL and preference recipes' section of RESULTS.md: issue 14's memory targets for GRPO and DPO,
fastpeft against TRL + PEFT + bitsandbytes, each measured by the memory ledger (fake tensors).

``fastpeft bench --ledger-recipes`` measures (``fastpeft.training.ledger_recipes``: minutes on a
CPU), writes ``results/ledger/recipe-ledger.json`` and regenerates RESULTS.md, which renders that
JSON; ``--small`` runs the same code on a tiny config (printed, never recorded).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA = "recipe-ledger-1"
GiB = 2**30
FILE = Path("ledger") / "recipe-ledger.json"
# (label, recipe, prompt, completion, G (GRPO) / pairs (DPO), micro-batch, goal GiB, reference)
TARGETS = (
    ("GRPO, G = 8, prompt 512 + completion 1024", "grpo", 512, 1024, 8, 4, 12.0, "-"),
    (
        "GRPO, G = 8, 20,000-token context (prompt 512 + completion 19,488)",
        "grpo",
        512,
        19_488,
        8,
        1,
        40.0,
        "unsloth reports 54.3 GB, TRL + FA2 510.8 GB",
    ),
    (
        "DPO, chosen + rejected 2 × 4096 tokens (prompt 512 + completion 3584 each), batch 1",
        "dpo",
        512,
        3584,
        1,
        1,
        10.0,
        "-",
    ),
)
# (key, stack, design): fastpeft with the long-context design (the target's column) and its default step
COLUMNS = (("fastpeft", "fastpeft", "long"), ("fastpeft_default", "fastpeft", "default"), ("trl", "trl", "default"))
SMALL = ("tiny", 8, 24, 4, 2)  # size, prompt, completion, G, micro-batch


def _design(name: str) -> Any:
    from fastpeft.training.step_design import StepDesign

    return StepDesign.long_context() if name == "long" else StepDesign()


def _measure_one(
    size: str, recipe: str, prompt: int, completion: int, group: int, micro: int, stack: str, design: str
) -> dict[str, Any]:
    from fastpeft.training.ledger_recipes import RecipeLedgerSpec, measure_recipe

    from .scenarios.memory import ledger_config

    spec = RecipeLedgerSpec(
        ledger_config(size),
        recipe=recipe,
        stack=stack,
        prompt_len=prompt,  # type: ignore[arg-type]
        completion_len=completion,
        group_size=group if recipe == "grpo" else 1,
        num_prompts=1 if recipe == "grpo" else group,
        micro_batch_size=micro,
        design=_design(design),
    )
    phases = {name: res.to_json() for name, res in measure_recipe(spec).items()}
    return {
        "phases": phases,
        "peak_bytes": max(p["peak_bytes"] for p in phases.values()),
        "design": spec.design.label(),
    }


def measure(small: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every number of the section (seconds with ``small``)."""
    start = time.perf_counter()
    out: dict[str, Any] = {"schema": SCHEMA, "small": small, "size": SMALL[0] if small else "8B", "targets": []}
    for label, recipe, prompt, completion, group, micro, goal, reference in TARGETS:
        if small:
            _, prompt, completion, group, micro = SMALL
        log(f"recipe ledger: {label}")
        row = {
            "label": label,
            "recipe": recipe,
            "prompt": prompt,
            "completion": completion,
            "group": group,
            "micro_batch": micro,
            "goal_gib": goal,
            "reference": reference,
        }
        for key, stack, design in COLUMNS:
            row[key] = _measure_one(out["size"], recipe, prompt, completion, group, micro, stack, design)
        out["targets"].append(row)
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
    path = Path(results_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def load(results_dir: Path) -> dict[str, Any] | None:
    path = Path(results_dir) / FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("schema") == SCHEMA and not data.get("small") else None


def _gib(n: float) -> str:
    from fastpeft.training.memory_ledger import format_gib

    return format_gib(n)


def _phases(result: dict[str, Any]) -> str:
    parts = [
        f"{name} {_gib(p['peak_bytes'])}" + (f" + host {_gib(p['host_peak_bytes'])}" if p["host_peak_bytes"] else "")
        for name, p in result["phases"].items()
    ]
    return " / ".join(parts)


def render(data: dict[str, Any]) -> str:
    """The RESULTS.md section for ``data`` (from :func:`measure`, as written by :func:`write`)."""
    from fastpeft.training.memory_ledger import LedgerResult, format_ledger_table

    lines = [
        "## Memory ledger: RL and preference recipes (GRPO, DPO)",
        "",
        f"`{data.get('command', 'fastpeft bench --ledger-recipes')}` · {data.get('date', '')[:16].replace('T', ' ')} "
        f"UTC · commit {data.get('git', {}).get('commit', 'unknown')[:10]} · "
        + " · ".join(f"{k} {v}" for k, v in data.get("versions", {}).items()),
        "",
        f'Llama "{data["size"]}" of `../shared/ANCHORS.md`, QLoRA r 16 on all seven projections, bf16, AdamW '
        "(foreach) on the adapters, one prompt per step (GRPO). fastpeft: the long-context step design "
        "(offloaded checkpointing + tiled MLP + lean RMSNorm; config `offload_activations`, `mlp_tile_rows`, "
        "`lean_norms`) and the default step (transformers' checkpointing); TRL + PEFT: reentrant "
        "checkpointing (`prepare_model_for_kbit_training`). Each phase is measured on its own with the "
        "weights, adapters and optimizer state resident; the step's peak is the larger. GRPO sampling: the KV "
        "cache at its largest (fastpeft: each prompt's KV once, read by its G completions; TRL without vLLM: "
        "`generate` on the prompt repeated G times, in the fp32 the PEFT-prepared model computes in). "
        "Training: reference pass (adapters disabled; GRPO beta 0.04, DPO beta 0.1, reference on the fly), "
        "forward + backward over micro-batches (same size for both stacks), AdamW step. TRL: its own "
        "`add_fused_lm_head` (1.16's chunked log-prob head) on the ledger's HF + bnb + PEFT model; off CUDA "
        "it scores prompt rows too, so its LM-head terms are slightly larger than on a GPU.",
        "",
        "| target | goal | fastpeft (ledger) | reached | TRL + PEFT + bnb (ledger) | for reference |",
        "|---|---|---|---|---|---|",
    ]
    for row in data["targets"]:
        ours, default, trl = row["fastpeft"], row["fastpeft_default"], row["trl"]
        ok = "yes" if ours["peak_bytes"] <= row["goal_gib"] * GiB else "**no**"
        lines.append(
            f"| {row['label']} (micro-batch {row['micro_batch']}) | ≤ {row['goal_gib']:g} GiB | "
            f"**{_gib(ours['peak_bytes'])}** ({_phases(ours)}); default step {_gib(default['peak_bytes'])} "
            f"({_phases(default)}) | {ok} | {_gib(trl['peak_bytes'])} ({_phases(trl)}) | {row['reference']} |"
        )
    for row in data["targets"]:
        columns = {
            f"{name} {phase}": LedgerResult(**res)
            for name, key in (("fastpeft", "fastpeft"), ("fastpeft default", "fastpeft_default"), ("TRL", "trl"))
            for phase, res in row[key]["phases"].items()
        }
        lines += ["", f"{row['label']}:", "", format_ledger_table(columns)]
    lines += [
        "",
        "- fake CPU tensors under FakeTensorMode: bytes of tensor storage alive at once, not a timing; "
        "allocator rounding and fragmentation and the CUDA context are not included",
        '- in the sampling columns the KV cache is under "activations" (made by the forward, kept); the recipe '
        "phases have no separate loss phase, so the LM head's log-prob terms are in the forward and backward rows",
        f"- measured in {data['seconds'] / 60:.0f} min on a CPU",
        "",
    ]
    return "\n".join(lines)
