"""``fastpeft plan --measure``: the length search, config loading, and the command end to end."""

from __future__ import annotations

import json

import pytest

from fastpeft.training.plan_measure import load_model_config, longest_context


@pytest.mark.parametrize("quadratic", [0.0, 3e-4])
@pytest.mark.parametrize("budget", [10**6, 5 * 10**7, 3 * 10**9])
def test_search_finds_the_last_length_that_fits(budget, quadratic):
    def peak(tokens: int) -> int:  # affine with a step (the loss chunk) and optionally quadratic (attention)
        return int(2 * 10**6 + 1000 * tokens + 50_000 * (tokens >= 8192) + quadratic * tokens**2)

    found = longest_context(peak, budget, resolution=256)
    if found.tokens == 0:
        assert peak(256) > budget
    else:
        assert found.tokens % 256 == 0 and peak(found.tokens) <= budget < peak(found.tokens + 256)
        assert found.peak_bytes == peak(found.tokens) and found.next_peak_bytes == peak(found.tokens + 256)
    assert len(found.probes) <= 16


def test_search_stops_at_the_cap():
    found = longest_context(lambda t: t, 10**12, resolution=256, max_tokens=1 << 14)
    assert found.capped and found.tokens == 1 << 14 and found.next_peak_bytes is None


def test_model_config_from_directory_file_or_dict(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 8, "torch_dtype": "bfloat16", "architectures": ["X"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model_config(tmp_path) == {"model_type": "llama", "hidden_size": 8}
    assert load_model_config(tmp_path / "config.json") == load_model_config(cfg)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_config(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_type"):
        load_model_config({"hidden_size": 8})


def test_plan_measure_command(tmp_path, capsys):
    from fastpeft.cli import main

    cfg = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 64,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # 0.45 MiB for tensors: a few thousand tokens of this model, found in a handful of probes
    rc = main(
        [
            "plan",
            "--model",
            str(tmp_path),
            "--gpu-memory-gib",
            "1.00045",
            "--cuda-context-gib",
            "1.0",
            "--seq-len",
            "64",
            "--measure",
            "true",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "longest context (batch 1)" in out and "qlora" in out and "0.00045 GiB for tensors" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["full"], ["lora"], ["qlora"])}
    assert len(lines) == 3 and "tokens" in lines["qlora"]
    assert "bytes of tensor storage alive at once" in out
    rc = main(["plan", "--model", str(tmp_path), "--gpu-memory-gib", "0.5", "--measure", "true"])
    assert rc == 2 and "must exceed the CUDA context allowance" in capsys.readouterr().err
