"""``fastpeft reward [CONFIG.yaml] [--key value ...] [--nproc N]``: :func:`fastpeft.training.reward_model.train`."""

from __future__ import annotations

from fastpeft.cli.launch import run_recipe

SUMMARY = "Train a reward model (LoRA/QLoRA + scalar head, Bradley-Terry) on prompt/chosen/rejected JSONL."


def main(argv: list[str]) -> int:
    return run_recipe("reward", argv, "fastpeft.training.reward_model", "RewardConfig", SUMMARY)
