"""The subcommands: one help style, YAML + overrides, one-line errors with exit status 2, and an
end-to-end sft -> merge -> info round trip on a tiny local model."""

from __future__ import annotations

import json

import pytest
import torch

from fastpeft.cli import COMMANDS, main
from fastpeft.training.model_setup import build_model


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_in_the_one_argument_style(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastpeft {name}") and "[CONFIG.yaml] [--key value ...] [--set key=value ...]" in out


def test_top_level_usage_lists_every_command_and_rejects_unknown_ones(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(None, 1) for line in out.splitlines() if line.startswith("  ")]
    assert sorted(name for name, _ in rows) == sorted(COMMANDS) and all(help_.strip() for _, help_ in rows)
    assert main(["tarot"]) == 2 and "unknown command 'tarot'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sft", "--bogus", "1"], "unknown key 'bogus'"),
        (["sft", "--lr", "fast", "--model_config", "{model_type: llama}"], "lr: expected a number, got 'fast'"),
        (["sft", "--train_data", "/no/such.jsonl", "--model_config", "{model_type: llama}"], "does not exist"),
        (["sft", "--model_config", "{model_type: llama}"], "train_data is required"),
        (["sft", "/no/such/config.yaml"], "config file '/no/such/config.yaml' does not exist"),
        (["merge", "--output", "x"], "merge needs --adapter DIR and --output DIR"),
        (["plan", "--model", "/no/such/dir"], "does not exist"),
        (["plan", "--seq_len", "many"], "seq_len: expected an integer"),
        (["info", "--path", "/no/such/dir"], "does not exist"),
        (["demo", "--sft_steps", "x"], "sft_steps: expected an integer"),
    ],
)
def test_bad_configs_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"fastpeft {argv[0]}: error:")
    assert message in err


def test_sft_merge_info_round_trip(tmp_path, tiny_llama, char_tokenizer, arithmetic_records, capsys):
    fastpeft = pytest.importorskip("fastpeft")
    base_dir = tmp_path / "base"
    model = build_model(None, tiny_llama(), seed=0)
    model.save_pretrained(base_dir)
    char_tokenizer.save_pretrained(base_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_records[:16]))
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: {base_dir}\ntrain_data: {data}\nfinetune: lora\nlora: {{r: 8, lora_alpha: 16}}\n"
        f"output_dir: {tmp_path / 'run'}\nmicro_batch_size: 4\nlr: 0.05\nprogress: false\n"
        "plot: false\n"
    )
    assert main(["sft", str(config), "--max_steps", "2", "--set", "lora.r=4", "--save_every", "2"]) == 0
    out = capsys.readouterr().out
    assert "final loss" in out and "tokens/s" in out
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4  # the override won

    assert (
        main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged"), "--model", str(base_dir)]) == 0
    )
    merged = build_model(str(tmp_path / "merged"), None)
    with_adapter = build_model(str(base_dir), None)
    fastpeft.load_adapter(with_adapter, adapter)
    ids = torch.tensor([char_tokenizer("Q: 12+34=?\nA:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    assert main(["info", str(adapter)]) == 0
    assert "adapter (LORA)" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "run")]) == 0
    assert "training checkpoint" in capsys.readouterr().out


def test_plan_cli_prints_a_recommendation(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            dict(
                model_type="llama",
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=16,
                num_key_value_heads=8,
                vocab_size=32000,
            )
        )
    )
    assert (
        main(["plan", "--model", str(cfg), "--gpu-memory-gib", "2.5", "--seq_len", "2048", "--data_tokens", "1e6"]) == 0
    )
    out = capsys.readouterr().out
    assert "recommendation: qlora" in out and "total_ckpt" in out


def _quick_demo(tmp_path, **extra) -> list[str]:
    argv = [
        "demo",
        "--output_dir",
        str(tmp_path / "demo"),
        "--pretrain_examples",
        "64",
        "--pretrain_steps",
        "3",
        "--train_examples",
        "24",
        "--eval_examples",
        "6",
        "--sft_steps",
        "2",
        "--hidden_size",
        "32",
        "--num_layers",
        "1",
        "--max_new_tokens",
        "4",
        "--progress",
        "false",
        "--micro_batch_size",
        "4",
    ]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def test_demo_pipeline_runs_end_to_end(tmp_path, capsys):
    assert main(_quick_demo(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "[1/3] pretraining" in out and "exact match before SFT" in out and "exact match: " in out
    assert "tokens/s" in out and "peak memory" in out
    assert (tmp_path / "demo" / "sft" / "adapter" / "adapter_model.safetensors").is_file()


def test_demo_with_local_model_and_jsonl(tmp_path, tiny_llama, char_tokenizer, arithmetic_records, capsys):
    base_dir = tmp_path / "base"
    build_model(None, tiny_llama(), seed=0).save_pretrained(base_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_records[:30]))
    assert main(_quick_demo(tmp_path, model=base_dir, data=data)) == 0
    out = capsys.readouterr().out
    assert f"using the local model {base_dir}" in out and "on 6 held-out questions" in out
