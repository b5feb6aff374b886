"""The step design in the SFT recipe and the benchmark step: same training, less memory."""

from __future__ import annotations

import pytest

from fastpeft.training.config_io import ConfigError, parse_cli
from fastpeft.training.metrics import read_metrics
from fastpeft.training.sft import SFTConfig, train
from fastpeft.training.step_design import StepDesign


def test_sft_with_the_long_context_design_trains_like_plain_checkpointing(tmp_path, tiny_llama, arithmetic_records):
    losses = {}
    for name, extra in (
        ("plain", {}),
        ("long", {"offload_activations": True, "mlp_tile_rows": 16, "lean_norms": True}),
    ):
        cfg = SFTConfig(
            model_config=tiny_llama(),
            finetune="qlora",
            lora={"r": 4, "lora_alpha": 8},
            train_data=arithmetic_records[:16],
            max_steps=3,
            micro_batch_size=4,
            lr=1e-2,
            output_dir=str(tmp_path / name),
            progress=False,
            plot=False,
            log_every=1,
            max_seq_len=64,
            gradient_checkpointing=True,
            **extra,
        )
        result = train(cfg)
        assert result.steps == 3
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert losses["long"] == pytest.approx(losses["plain"], rel=1e-4)


def test_cli_switches_and_validation(tiny_llama):
    cfg = parse_cli(SFTConfig, ["--offload_activations", "true", "--mlp_tile_rows", "1024", "--lean_norms", "true"])
    assert (cfg.offload_activations, cfg.mlp_tile_rows, cfg.lean_norms) == (True, 1024, True)
    with pytest.raises(ValueError, match="mlp_tile_rows"):
        SFTConfig(mlp_tile_rows=-4)
    with pytest.raises(ConfigError, match="offload_activations"):
        parse_cli(SFTConfig, ["--offload_activations", "maybe"])


def test_benchmark_step_applies_the_design(tiny_llama):
    from fastpeft.cli.bench import load_benchmarks

    load_benchmarks()
    from fastpeft_benchmarks.training_steps import run_training_steps

    config = {k: v for k, v in tiny_llama().items() if k != "model_type"}
    design = {"offload_activations": True, "mlp_tile_rows": 8, "lean_norms": True}
    out = run_training_steps(
        config,
        steps=1,
        batch_size=2,
        seq_len=24,
        device="cpu",
        warmup_steps=0,
        design=design,
        dtype="float32",
        bf16_autocast=False,
    )
    assert out["design"] == design and out["tokens_per_s"] > 0 and out["gradient_checkpointing"]


def test_design_label_and_long_context_preset():
    d = StepDesign.long_context()
    assert d.offload_activations and d.lean_norms and d.mlp_tile_rows
    assert d.label() == f"offloaded checkpointing + tiled MLP ({d.mlp_tile_rows} rows) + lean RMSNorm"
    assert StepDesign(gradient_checkpointing=False).label() == "no checkpointing"
