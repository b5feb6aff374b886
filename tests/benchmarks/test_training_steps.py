"""The training-step measuring function behind ``fastpeft bench qlora-step``."""

from __future__ import annotations

import pytest

from fastpeft.cli.bench import load_benchmarks

load_benchmarks()

from fastpeft_benchmarks import training_steps  # noqa: E402

# hidden 32, 4 heads of 8, 2 KV heads: q/o 32->32, k/v 32->16, gate/up 32->64, down 64->32
CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
)
LORA_R16_PARAMS = 16 * (2 * (32 + 32) + 2 * (32 + 16) + 2 * (32 + 64) + (64 + 32))  # r * (in + out), 7 projections


def _run(**kwargs):
    args = dict(steps=2, batch_size=2, seq_len=16, device="cpu", dtype="float32", bf16_autocast=False, warmup_steps=1)
    return training_steps.run_training_steps(CONFIG, **{**args, **kwargs})


def test_only_timed_steps_count_and_training_lowers_the_loss(monkeypatch):
    clock = iter([10.0, 12.0])  # the timed loop starts at 10 s and ends at 12 s
    monkeypatch.setattr(training_steps.time, "perf_counter", lambda: next(clock))
    out = _run(steps=4, finetune="qlora")
    assert out["tokens_per_s"] == 4 * 2 * 16 / 2.0 and out["step_seconds"] == 0.5  # warm-up excluded
    assert out["trainable_params"] == LORA_R16_PARAMS and out["finetune"] == "qlora"
    assert out["peak_memory_bytes"] > 0
    monkeypatch.undo()
    # the same seeded batch every step, so each AdamW update lowers the loss reported for the last step
    losses = [_run(steps=s, finetune="qlora", lora={"lora_alpha": 512})["loss"] for s in (1, 3)]
    assert losses[1] < losses[0]
    assert _run(steps=1, finetune="qlora", lora={"lora_alpha": 512})["loss"] == losses[0]  # deterministic in seed


def test_full_fine_tuning_trains_every_parameter():
    from fastpeft.training.model_setup import build_model

    out = _run(finetune="full", bf16_autocast=True)
    total = sum(p.numel() for p in build_model(None, {"model_type": "llama", **CONFIG}).parameters())
    assert out["trainable_params"] == total and out["finetune"] == "full"


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="need steps > 0"):
        _run(steps=0, finetune="qlora")
