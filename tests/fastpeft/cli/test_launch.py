"""The training subcommands share one launcher: --nproc, required keys, one-line errors."""

from __future__ import annotations

import pytest

from fastpeft.cli import main
from fastpeft.cli.launch import split_nproc
from fastpeft.training.config_io import ConfigError


def test_split_nproc():
    assert split_nproc(["cfg.yaml", "--nproc", "3", "--lr", "1"]) == (["cfg.yaml", "--lr", "1"], 3)
    assert split_nproc(["--lr", "1"]) == (["--lr", "1"], 1)
    for bad in (["--nproc"], ["--nproc", "two"], ["--nproc", "0"]):
        with pytest.raises(ConfigError, match="--nproc needs a positive integer"):
            split_nproc(bad)


@pytest.mark.parametrize("command", ["sft", "reward", "dpo", "grpo", "ppo"])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc", "-1"], "--nproc needs a positive integer"),
        (["--model_config", "{model_type: llama}"], "train_data is required"),
        (["--train_data", "x.jsonl"], "give `model`"),
        (["--train_data", "/no/such.jsonl", "--model_config", "{model_type: llama}"], "does not exist"),
        (["--lr", "1", "--lr", "2"], "'lr' is given twice"),
    ],
)
def test_every_recipe_command_checks_the_same_things(command, argv, message, capsys):
    assert main([command, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastpeft {command}: error:") and message in err and "\n" not in err
