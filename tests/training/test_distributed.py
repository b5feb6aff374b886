"""DDP on CPU (gloo): two spawned processes take the same steps as one process with the same
global batch."""

from __future__ import annotations

import pytest

from fastpeft.training.distributed import launch_local
from fastpeft.training.metrics import read_metrics
from fastpeft.training.sft import SFTConfig, train


def _losses(path) -> list[float]:
    return [r["loss"] for r in read_metrics(path / "metrics.jsonl") if "loss" in r]


def test_two_ranks_match_one_process(tmp_path, tiny_llama, arithmetic_records, monkeypatch):
    # spawned ranks inherit the environment: keep them on the torch reference like this process
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    common = dict(model_config=tiny_llama(), finetune="full", train_data=arithmetic_records[:24], lr=1e-2,
                  progress=False, plot=False, log_every=1, max_seq_len=64, max_steps=3, device="cpu",
                  save_every=3)  # fmt: skip
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
