"""Bad inputs to merge / info / plan / demo / sft end with one line and exit status 2 (before any
model is loaded or pretrained), never a traceback, a silent no-op or a NaN model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.cli import main
from fastpeft.demo import embedded_job as demo
from fastpeft.training.model_setup import build_model


@pytest.fixture
def base_and_adapter(tmp_path, tiny_llama):
    base = tmp_path / "base"
    model = build_model(None, tiny_llama(), seed=0)
    model.save_pretrained(base)
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter = fastpeft.save_adapter(model, tmp_path / "adapter")
    return base, adapter


def _one_line_error(argv, capsys, after_loading: bool = False) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    if after_loading:  # transformers' weight-loading progress bar may precede the error line
        assert "Traceback" not in err
        err = err.splitlines()[-1]
    assert err.count("\n") == 0 and err.startswith(f"fastpeft {argv[0]}: error:"), err
    return err


def test_merge_into_an_existing_file_is_an_error_and_writes_nothing(base_and_adapter, tmp_path, capsys, monkeypatch):
    base, adapter = base_and_adapter
    target = tmp_path / "merged.bin"
    target.write_text("keep me")
    import fastpeft.training.model_setup as setup

    monkeypatch.setattr(setup, "build_model", lambda *a, **k: pytest.fail("loaded the model before checking output"))
    err = _one_line_error(["merge", "--adapter", str(adapter), "--output", str(target), "--model", str(base)], capsys)
    assert "output:" in err and "is not a directory" in err
    assert target.read_text() == "keep me"


def test_merge_refuses_a_nan_adapter(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    out = tmp_path / "merged"
    argv = ["merge", "--adapter", str(adapter), "--output", str(out), "--model", str(base)]
    err = _one_line_error(argv, capsys, after_loading=True)
    assert key in err and "NaN" in err
    assert not (out / "model.safetensors").exists()


def test_merge_and_unload_refuses_nan_weights_before_touching_the_model(tiny_llama):
    model = build_model(None, tiny_llama(), seed=0)
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.adapters["default"].lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"NaN/inf weights in model.layers.1.self_attn.q_proj"):
        fastpeft.merge_and_unload(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, fastpeft.AdapterLinear)  # nothing replaced


def test_adapter_config_that_is_a_json_list(base_and_adapter, tmp_path, capsys, tiny_llama):
    base, adapter = base_and_adapter
    (adapter / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got a list"):
        fastpeft.load_adapter(build_model(None, tiny_llama(), seed=0), adapter)
    err = _one_line_error(
        ["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m"), "--model", str(base)], capsys
    )
    assert "must hold a JSON object, got a list" in err
    assert "must hold a JSON object, got a list" in _one_line_error(["info", str(adapter)], capsys)


def test_info_on_a_truncated_adapter(base_and_adapter, capsys):
    _, adapter = base_and_adapter
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    assert "is truncated or corrupted" in _one_line_error(["info", str(adapter)], capsys)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--gpu_memory_gib", "0"),
        ("--gpu_memory_gib", "-8"),
        ("--gpu_memory_gib", "nan"),
        ("--seq_len", "0"),
        ("--seq_len", "-5"),
        ("--batch_size", "0"),
        ("--batch_size", "-1"),
    ],
)
def test_plan_refuses_non_positive_sizes(flag, value, capsys):
    err = _one_line_error(["plan", "--model_config", "{model_type: llama}", flag, value], capsys)
    assert f"{flag[2:]} must be a positive number" in err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--sft_steps", "0", "sft_steps must be positive"),
        ("--digits", "-1", "digits must be positive"),
        ("--sft_lr", "nan", "sft_lr must be positive"),
        ("--eval_match", "fuzzy", "eval_match must be"),
        ("--num_heads", "5", "divisible"),
    ],
)
def test_demo_validates_before_pretraining(flag, value, message, capsys, monkeypatch):
    monkeypatch.setattr(demo, "_pretrain", lambda *a: pytest.fail("pretrained before validating the arguments"))
    assert message in _one_line_error(["demo", flag, value], capsys)


def test_demo_and_sft_refuse_an_output_dir_that_is_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "_pretrain", lambda *a: pytest.fail("pretrained before checking the output"))
    blocker = tmp_path / "out"
    blocker.write_text("x")
    assert "is not a directory" in _one_line_error(["demo", "--output_dir", str(blocker)], capsys)
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    argv = ["sft", "--model_config", "{model_type: llama}", "--train_data", str(data), "--output_dir", str(blocker)]
    assert "output_dir:" in _one_line_error(argv, capsys)


def test_an_unknown_chat_role_is_an_error_naming_it(tmp_path, char_tokenizer, capsys):
    from fastpeft.training.data import tokenize_record

    record = {"messages": [{"role": "usr", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    with pytest.raises(ValueError, match="unknown chat role usr"):
        tokenize_record(record, char_tokenizer, 64)
    with pytest.raises(ValueError, match="'messages' must be a list"):
        tokenize_record({"messages": [{"role": "user"}]}, char_tokenizer, 64)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(record) + "\n")
    argv = [
        "sft",
        "--model_config",
        "{model_type: llama, hidden_size: 32, intermediate_size: 64, "
        "num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 112}",
        "--train_data",
        str(data),
        "--output_dir",
        str(tmp_path / "run"),
    ]
    assert "unknown chat role usr" in _one_line_error(argv, capsys, after_loading=True)
