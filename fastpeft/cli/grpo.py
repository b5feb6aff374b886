"""``fastpeft grpo [CONFIG.yaml] [--key value ...] [--nproc N]``: :func:`fastpeft.training.grpo.train`."""

from __future__ import annotations

from fastpeft.cli.launch import run_recipe

SUMMARY = "GRPO with verifiable rewards (e.g. rewards: {answer: 1.0}) and the batched sampler."


def main(argv: list[str]) -> int:
    return run_recipe("grpo", argv, "fastpeft.training.grpo", "GRPOConfig", SUMMARY)
