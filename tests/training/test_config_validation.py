"""Optimisation fields that silently misbehaved (gradient ascent, every checkpoint deleted, no
learning) are refused with one line naming the field, by SFT and RL configs alike (one check)."""

import math

import pytest

from fastpeft.cli import main
from fastpeft.training import checkpoint as ckpt
from fastpeft.training.dpo import DPOConfig
from fastpeft.training.grpo import GRPOConfig
from fastpeft.training.recipe import RecipeConfig
from fastpeft.training.sft import SFTConfig

BAD = [
    ("keep_checkpoints", -1),
    ("max_grad_norm", -1.0),
    ("max_grad_norm", 0.0),
    ("max_grad_norm", math.nan),
    ("warmup_steps", -1),
    ("max_bad_steps", -1),
    ("lr", 0.0),
    ("lr", math.inf),
    ("max_steps", 0),
]


@pytest.mark.parametrize("cls", [SFTConfig, RecipeConfig, DPOConfig, GRPOConfig])
@pytest.mark.parametrize("field, value", BAD)
def test_bad_optimisation_fields_are_refused_in_one_line(cls, field, value):
    with pytest.raises(ValueError) as err:
        cls(**{field: value})
    message = str(err.value)
    assert message.startswith(f"{field} ") and "\n" not in message


@pytest.mark.parametrize("value", [-1.0, 0.0, math.nan])
def test_sft_num_epochs_must_be_positive(value):
    with pytest.raises(ValueError, match=r"^num_epochs "):
        SFTConfig(num_epochs=value)


@pytest.mark.parametrize("cls", [SFTConfig, RecipeConfig])
def test_valid_edge_values_are_kept(cls):
    config = cls(keep_checkpoints=0, max_grad_norm=None, warmup_steps=0, max_bad_steps=0)
    assert (config.keep_checkpoints, config.max_grad_norm, config.max_bad_steps) == (0, None, 0)
    assert cls(keep_checkpoints=None).keep_checkpoints is None


def test_keep_checkpoints_zero_keeps_all_and_negative_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        tmp = ckpt.begin_checkpoint(root, step)
        (tmp / "trainer_state.json").write_text("{}")
        ckpt.commit_checkpoint(root, tmp, step, keep=0)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000001", "step-000002", "step-000003"]
    tmp = ckpt.begin_checkpoint(root, 4)
    with pytest.raises(ValueError, match="keep_checkpoints"):
        ckpt.commit_checkpoint(root, tmp, 4, keep=-1)
    assert ckpt.latest_checkpoint(root).name == "step-000003"


def test_cli_refuses_negative_keep_checkpoints(tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    argv = ["sft", "--model_config", "{model_type: llama}", "--train_data", str(data), "--keep_checkpoints", "-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "keep_checkpoints must be" in err
