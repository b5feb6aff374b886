"""``fastpeft reward|dpo|grpo|ppo [CONFIG.yaml] [--key value ...] [--set key=value ...] [--nproc N]``.

Each runs its recipe's ``train(config)``. Under ``torchrun`` every rank runs the same command;
``--nproc N`` spawns N local processes instead (gloo on CPU, NCCL on GPU). Bad configurations
print one line and exit with status 2 (``fastpeft.training.cli_common``).
"""

from __future__ import annotations

import importlib
from typing import Any

from fastpeft.training.cli_common import config_help, run_cli
from fastpeft.training.config_io import ConfigError, parse_cli

# subcommand -> (module, config class, summary)
RECIPES = {
    "reward": ("fastpeft.training.reward_model", "RewardConfig",
               "Train a reward model (LoRA/QLoRA + scalar head, Bradley-Terry) on prompt/chosen/rejected JSONL."),
    "dpo": ("fastpeft.training.dpo", "DPOConfig",
            "DPO / IPO on prompt/chosen/rejected JSONL; the reference is the model with adapters disabled."),
    "grpo": ("fastpeft.training.grpo", "GRPOConfig",
             "GRPO with verifiable rewards (e.g. rewards: {arithmetic: 1.0}) and the batched sampler."),
    "ppo": ("fastpeft.training.ppo", "PPOConfig",
            "PPO with a value head, GAE and clipped losses on the GRPO rollout machinery."),
}  # fmt: skip


def _report(name: str, result: Any) -> None:
    print(f"{name}: steps {result.steps}  final loss {result.final_loss}")
    for key, value in (result.eval or {}).items():
        print(f"{key}: {value}")
    print(f"saved: {result.saved}  metrics: {result.output_dir / 'metrics.jsonl'}")


def _train_and_report(name: str, config: Any) -> None:  # module level so spawned ranks can import it
    from fastpeft.training.distributed import world

    result = importlib.import_module(RECIPES[name][0]).train(config)
    if world()[0] == 0:
        _report(name, result)


def _split_nproc(argv: list[str]) -> tuple[list[str], int]:
    if "--nproc" not in argv:
        return argv, 1
    i = argv.index("--nproc")
    try:
        nproc = int(argv[i + 1])
    except (IndexError, ValueError) as err:
        raise ConfigError("--nproc needs a positive integer") from err
    if nproc <= 0:
        raise ConfigError("--nproc needs a positive integer")
    return argv[:i] + argv[i + 2 :], nproc


def _config_class(name: str) -> type:
    module, cls, _ = RECIPES[name]
    return getattr(importlib.import_module(module), cls)


def run(name: str, argv: list[str]) -> int:
    def body(args: list[str]) -> int:
        args, nproc = _split_nproc(args)
        config = parse_cli(_config_class(name), args)
        if config.train_data is None:
            raise ConfigError("train_data is required (a .jsonl/.json file or a datasets directory)")
        if config.model is None and config.model_config is None:
            raise ConfigError("give `model` (a local Hugging Face directory) or `model_config` (a dict)")
        if nproc > 1:
            from fastpeft.training.distributed import launch_local

            launch_local(_train_and_report, (name, config), nproc)
        else:
            _train_and_report(name, config)
        return 0

    return run_cli(name, argv, body, lambda: config_help(_config_class(name), name, RECIPES[name][2]))


def main_reward(argv: list[str]) -> int:
    return run("reward", argv)


def main_dpo(argv: list[str]) -> int:
    return run("dpo", argv)


def main_grpo(argv: list[str]) -> int:
    return run("grpo", argv)


def main_ppo(argv: list[str]) -> int:
    return run("ppo", argv)
