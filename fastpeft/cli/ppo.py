"""``fastpeft ppo [CONFIG.yaml] [--key value ...] [--nproc N]``: :func:`fastpeft.training.ppo.train`."""

from __future__ import annotations

from fastpeft.cli.launch import run_recipe

SUMMARY = "PPO with a value head, GAE and clipped losses on the GRPO rollout machinery."


def main(argv: list[str]) -> int:
    return run_recipe("ppo", argv, "fastpeft.training.ppo", "PPOConfig", SUMMARY)
