"""``fastpeft plan --model DIR|config.json --gpu-memory-gib 24 --seq-len 2048 --data-tokens 5e6``:
estimate peak memory of full fine-tuning, LoRA and QLoRA and recommend one; with ``--measure``,
measure it with the memory ledger and find the longest context that fits."""

from __future__ import annotations

import sys

from fastpeft.cli.common import config_help, format_bytes, run_cli
from fastpeft.training.config_io import parse_cli
from fastpeft.training.plan import METHODS, PlanInputs, plan

_COLUMNS = (
    "weights",
    "adapters",
    "gradients",
    "optimizer",
    "activations",
    "activations_ckpt",
    "loss",
    "total",
    "total_ckpt",
)


def format_plan(result: dict, inputs: PlanInputs) -> str:
    budget = inputs.gpu_memory_gib * 2**30
    head = f"{'':<8}" + "".join(f"{c:>18}" for c in _COLUMNS)
    lines = [
        f"model: {result['params'] / 1e6:,.1f}M parameters; {inputs.batch_size} x {inputs.seq_len} tokens; "
        f"{inputs.dtype}; {inputs.optimizer}; device {inputs.gpu_memory_gib:g} GiB",
        "",
        head,
    ]
    for m in METHODS:
        e = result["estimates"][m]
        lines.append(f"{m:<8}" + "".join(f"{format_bytes(e[c]):>18}" for c in _COLUMNS))
    lines.append("")
    for m in METHODS:
        e = result["estimates"][m]
        fit = (
            "fits"
            if e["total"] <= budget
            else ("fits with checkpointing" if e["total_ckpt"] <= budget else "does not fit")
        )
        lines.append(f"{m}: {fit} ({e['trainable_params']:,} trainable parameters)")
    rec = result["recommendation"]
    ckpt = " with gradient checkpointing" if rec and result["gradient_checkpointing"] else ""
    lines += ["", f"recommendation: {rec or 'none'}{ckpt} - {result['reason']}"]
    return "\n".join(lines)


def _body(argv: list[str]) -> int:
    inputs = parse_cli(PlanInputs, argv)
    if inputs.measure:
        from fastpeft.training.plan_measure import format_measured, measure_plan

        print(format_measured(measure_plan(inputs, log=lambda s: print(s, file=sys.stderr)), inputs))
        return 0
    print(format_plan(plan(inputs), inputs))
    return 0


def main(argv: list[str]) -> int:
    return run_cli("plan", argv, _body, lambda: config_help(PlanInputs, "plan", __doc__.split("\n")[0]))
