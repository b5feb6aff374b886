"""``fastpeft sft [CONFIG.yaml] [--key value ...] [--set key=value ...] [--nproc N]``.

Runs :func:`fastpeft.training.sft.train`. Under ``torchrun`` each rank runs this same command;
``--nproc N`` instead spawns N local processes itself (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from fastpeft.training.cli_common import config_help, format_bytes, run_cli
from fastpeft.training.config_io import ConfigError, parse_cli

SUMMARY = ("Supervised fine-tuning (LoRA, QLoRA or full) of a local causal LM on JSONL / datasets / "
           "Python records, with checkpoints, resume and metrics.")  # fmt: skip


def _train_and_report(config) -> None:  # module level so spawned ranks can import it
    from fastpeft.training.distributed import world
    from fastpeft.training.sft import train

    result = train(config)
    if world()[0] == 0:
        print(f"steps: {result.steps}  final loss: {result.final_loss}")
        for key, value in result.eval.items():
            print(f"{key}: {value}")
        print(f"tokens/s: {result.tokens_per_s:.0f}  peak memory: {format_bytes(result.peak_memory_bytes)}")
        print(f"saved: {result.saved}  metrics: {result.output_dir / 'metrics.jsonl'}")


def _body(argv: list[str]) -> int:
    from fastpeft.training.sft import SFTConfig

    nproc = 1
    if "--nproc" in argv:
        i = argv.index("--nproc")
        try:
            nproc = int(argv[i + 1])
        except (IndexError, ValueError) as err:
            raise ConfigError("--nproc needs a positive integer") from err
        argv = argv[:i] + argv[i + 2 :]
        if nproc <= 0:
            raise ConfigError("--nproc needs a positive integer")
    config = parse_cli(SFTConfig, argv)
    if config.train_data is None:
        raise ConfigError("train_data is required (a .jsonl/.json file or a datasets directory)")
    if config.model is None and config.model_config is None:
        raise ConfigError("give `model` (a local Hugging Face directory) or `model_config` (a dict)")
    if isinstance(config.train_data, str):
        from pathlib import Path

        if not Path(config.train_data).exists():
            raise ConfigError(f"train_data: file or directory {config.train_data!r} does not exist")
    if nproc > 1:
        from fastpeft.training.distributed import launch_local

        launch_local(_train_and_report, (config,), nproc)
    else:
        _train_and_report(config)
    return 0


def main(argv: list[str]) -> int:
    from fastpeft.training.sft import SFTConfig

    return run_cli("sft", argv, _body, lambda: config_help(SFTConfig, "sft", SUMMARY) +
                   "\n  --nproc N                 spawn N local data-parallel processes")  # fmt: skip
