"""Running a training recipe from the command line: ``fastpeft sft|reward|dpo|grpo|ppo [CONFIG.yaml]
[--key value ...] [--set key=value ...] [--nproc N]``.

Each subcommand's module names its recipe (a module with a config dataclass and ``train(config)``);
:func:`run_recipe` parses the config, checks what every recipe needs, and trains. Under ``torchrun``
every rank runs the same command; ``--nproc N`` spawns N local processes instead (gloo on CPU, NCCL
on GPU). Bad configurations print one line and exit with status 2 (:func:`fastpeft.cli.common.run_cli`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastpeft.cli.common import config_help, run_cli
from fastpeft.training.config_io import ConfigError, parse_cli

NPROC_HELP = "\n  --nproc N                 spawn N local data-parallel processes"


def split_nproc(argv: list[str]) -> tuple[list[str], int]:
    """``(argv without --nproc N, N)``; N is 1 when the option is absent."""
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


def report(name: str, result: Any) -> None:
    print(f"{name}: steps {result.steps}  final loss {result.final_loss}")
    for key, value in (result.eval or {}).items():
        print(f"{key}: {value}")
    print(f"saved: {result.saved}  metrics: {result.output_dir / 'metrics.jsonl'}")


def _train_and_report(module: str, name: str, config: Any, show: Callable[[str, Any], None]) -> None:
    # module level, with only picklable arguments, so spawned ranks can import and run it
    from fastpeft.training.distributed import world

    result = importlib.import_module(module).train(config)
    if world()[0] == 0:
        show(name, result)


def run_recipe(
    name: str, argv: list[str], module: str, config_class: str, summary: str, show: Callable[[str, Any], None] = report
) -> int:
    """The ``fastpeft <name>`` command for the recipe ``module`` (config dataclass ``config_class``)."""

    def config_cls() -> type:
        return getattr(importlib.import_module(module), config_class)

    def body(args: list[str]) -> int:
        args, nproc = split_nproc(args)
        config = parse_cli(config_cls(), args)
        if config.train_data is None:
            raise ConfigError("train_data is required (a .jsonl/.json file or a datasets directory)")
        if config.model is None and config.model_config is None:
            raise ConfigError("give `model` (a local Hugging Face directory) or `model_config` (a dict)")
        if isinstance(config.train_data, str) and not Path(config.train_data).exists():
            raise ConfigError(f"train_data: file or directory {config.train_data!r} does not exist")
        if nproc > 1:
            from fastpeft.training.distributed import launch_local

            launch_local(_train_and_report, (module, name, config, show), nproc)
        else:
            _train_and_report(module, name, config, show)
        return 0

    return run_cli(name, argv, body, lambda: config_help(config_cls(), name, summary) + NPROC_HELP)
