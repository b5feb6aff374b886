"""DDP and FSDP2 on CPU (gloo): two spawned processes take the same steps as one process with the
same global batch, and write (and resume from) the same checkpoint files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastpeft.training.distributed import launch_local, wrap_for_training
from fastpeft.training.metrics import read_metrics
from fastpeft.training.sft import SFTConfig, train


def _losses(path) -> list[float]:
    return [r["loss"] for r in read_metrics(path / "metrics.jsonl") if "loss" in r]


def _records(path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(path / "metrics.jsonl") if key in r]


def _train_all(configs: list[SFTConfig]) -> None:
    """Several runs in one pair of spawned ranks (spawning dominates the test's time)."""
    for config in configs:
        train(config)


def _assert_tensors_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert set(got) == set(want), where
    for key, tensor in want.items():
        assert not isinstance(got[key], nn.Parameter) and got[key].shape == tensor.shape, (where, key)
        # Adam steps from gradients equal to ~1e-7 (reduction order) stay within lr * 1e-3
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{where} {key}: {m}")


def test_two_ranks_match_one_process(tmp_path, tiny_llama, arithmetic_records, monkeypatch):
    # spawned ranks inherit the environment: keep them on the torch reference like this process
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    common = dict(
        model_config=tiny_llama(),
        finetune="full",
        train_data=arithmetic_records[:24],
        lr=1e-2,
        progress=False,
        plot=False,
        log_every=1,
        max_seq_len=64,
        max_steps=3,
        device="cpu",
        save_every=3,
    )
    train(SFTConfig(output_dir=str(tmp_path / "one"), micro_batch_size=4, **common))
    # 2 ranks x 2 rows = the same global batch of 4 rows
    launch_local(train, (SFTConfig(output_dir=str(tmp_path / "two"), micro_batch_size=2, **common),), nprocs=2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-5)
    ckpt = tmp_path / "two" / "checkpoints" / "step-000003"
    assert (ckpt / "rng-rank0.pt").is_file() and (ckpt / "rng-rank1.pt").is_file()
    start = read_metrics(tmp_path / "two" / "metrics.jsonl")[0]
    assert start["world_size"] == 2


def test_fsdp_two_ranks_match_one_process_and_resume(tmp_path, tiny_llama, arithmetic_records, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # spawned ranks unpickle _train_all by its module name (tests.training.test_distributed); they get
    # this process's sys.path, which lacks the repo root when pytest runs as a console script
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    modes = ("full", "lora", "qlora")
    common = dict(
        model_config=tiny_llama(),
        train_data=arithmetic_records[:24],
        lr=1e-2,
        progress=False,
        plot=False,
        log_every=1,
        max_seq_len=64,
        max_steps=4,
        device="cpu",
        save_every=2,
        eval_data=arithmetic_records[-4:],
        eval_every=2,
        eval_max_new_tokens=3,
    )
    for mode in modes:
        train(SFTConfig(output_dir=str(tmp_path / f"one-{mode}"), micro_batch_size=4, finetune=mode, **common))
    # a single-process checkpoint (step 2 of 4) resumed by two FSDP ranks: the formats are the same; the
    # loss of step 4 shows that the optimizer state came back too
    for mode in ("full", "lora"):
        shutil.copytree(
            tmp_path / f"one-{mode}" / "checkpoints" / "step-000002",
            tmp_path / f"resumed-{mode}" / "checkpoints" / "step-000002",
        )
    # 2 ranks x 1 row x 2 accumulation steps = the same global batch of 4 rows
    fsdp = dict(common, micro_batch_size=1, grad_accum_steps=2, parallel="fsdp")
    runs = [SFTConfig(output_dir=str(tmp_path / f"two-{mode}"), finetune=mode, **fsdp) for mode in modes]
    runs += [
        SFTConfig(output_dir=str(tmp_path / f"resumed-{mode}"), finetune=mode, resume=True, **fsdp)
        for mode in ("full", "lora")
    ]
    launch_local(_train_all, (runs,), nprocs=2)

    for mode in modes:
        one, two = tmp_path / f"one-{mode}", tmp_path / f"two-{mode}"
        assert len(_losses(one)) == 4
        # the sharded run reduces in another order: equal to float32 rounding
        assert _losses(two) == pytest.approx(_losses(one), rel=1e-5), mode
        assert _records(two, "grad_norm") == pytest.approx(_records(one, "grad_norm"), rel=1e-5), mode
        assert len(_records(one, "eval_loss")) == 3  # at the start, after step 2 and at the end (step 4)
        assert _records(two, "eval_loss") == pytest.approx(_records(one, "eval_loss"), rel=1e-5), mode
        ckpt_one, ckpt_two = one / "checkpoints" / "step-000002", two / "checkpoints" / "step-000002"
        names = {p.name for p in ckpt_one.rglob("*")}
        assert {p.name for p in ckpt_two.rglob("*")} == names | {"rng-rank1.pt"}, mode
        _assert_tensors_close(
            load_file(ckpt_two / "trainable.safetensors"),
            load_file(ckpt_one / "trainable.safetensors"),
            f"{mode} trainable",
        )
        opt_one = torch.load(ckpt_one / "optimizer.pt", weights_only=True)
        opt_two = torch.load(ckpt_two / "optimizer.pt", weights_only=True)
        assert opt_two["param_groups"] == opt_one["param_groups"]
        for idx, state in opt_one["state"].items():
            _assert_tensors_close(opt_two["state"][idx], state, f"{mode} optimizer state {idx}")
        final = "model/model.safetensors" if mode == "full" else "adapter/adapter_model.safetensors"
        _assert_tensors_close(load_file(two / final), load_file(one / final), f"{mode} {final}")

    for mode in ("full", "lora"):
        resumed = tmp_path / f"resumed-{mode}"
        assert _losses(resumed) == pytest.approx(_losses(tmp_path / f"one-{mode}")[2:], rel=1e-5), mode


def test_parallel_config_is_checked():
    with pytest.raises(ValueError, match="parallel must be one of"):
        SFTConfig(parallel="zero3")
    with pytest.raises(ValueError, match="adamw_8bit"):
        SFTConfig(parallel="fsdp", optimizer="adamw_8bit")
    with pytest.raises(ValueError, match="_no_split_modules"):
        wrap_for_training(nn.Sequential(nn.Linear(4, 4)), "fsdp", torch.device("cpu"))
