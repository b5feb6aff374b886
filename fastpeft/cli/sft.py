"""``fastpeft sft [CONFIG.yaml] [--key value ...] [--set key=value ...] [--nproc N]``.

Runs :func:`fastpeft.training.sft.train` (see :mod:`fastpeft.cli.launch` for ``--nproc`` and torchrun).
"""

from __future__ import annotations

from typing import Any

from fastpeft.cli.common import format_bytes
from fastpeft.cli.launch import run_recipe

SUMMARY = (
    "Supervised fine-tuning (LoRA, QLoRA or full) of a local causal LM on JSONL / datasets / "
    "Python records, with checkpoints, resume and metrics."
)


def report(name: str, result: Any) -> None:
    print(f"steps: {result.steps}  final loss: {result.final_loss}")
    for key, value in result.eval.items():
        print(f"{key}: {value}")
    print(f"tokens/s: {result.tokens_per_s:.0f}  peak memory: {format_bytes(result.peak_memory_bytes)}")
    print(f"saved: {result.saved}  metrics: {result.output_dir / 'metrics.jsonl'}")


def main(argv: list[str]) -> int:
    return run_recipe("sft", argv, "fastpeft.training.sft", "SFTConfig", SUMMARY, report)
