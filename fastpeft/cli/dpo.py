"""``fastpeft dpo [CONFIG.yaml] [--key value ...] [--nproc N]``: :func:`fastpeft.training.dpo.train`."""

from __future__ import annotations

from fastpeft.cli.launch import run_recipe

SUMMARY = "DPO / IPO on prompt/chosen/rejected JSONL; the reference is the model with adapters disabled."


def main(argv: list[str]) -> int:
    return run_recipe("dpo", argv, "fastpeft.training.dpo", "DPOConfig", SUMMARY)
