"""``fastpeft search`` end to end on a tiny random Llama saved to a tmp dir, and its errors."""

import json

import pytest
import torch

from fastpeft.cli import main as fastpeft_main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpeft.training.tokenizer import load_char_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tok = load_char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tok),
        max_position_embeddings=128,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_search_command_writes_one_row_per_prompt(tiny_model_dir, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q: 1+2=?\nA:", "answer": "3"}, {"prompt": "Q: 4+4=?\nA:"}])
    out = tmp_path / "out.jsonl"
    rc = fastpeft_main(
        [
            "search",
            "--model",
            str(tiny_model_dir),
            "--input",
            str(inp),
            "--output",
            str(out),
            "--strategy",
            "beam_search",
            "--n",
            "4",
            "--beam-width",
            "2",
            "--stop",
            "; ",
            "--budget",
            "48",
            "--max-new-tokens",
            "6",
            "--no-progress",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["strategy"] == "beam_search" and 0 < row["tokens_spent"] <= 48
        assert {"answer", "score", "text", "forward_passes", "verifier_problems"} <= set(row)
        assert row["score"] is None or 0.0 <= row["score"] <= 1.0
    assert rows[0]["correct"] in (True, False) and rows[0]["reference"] == "3"
    assert "correct" not in rows[1]
    assert "accuracy 0/1" in capsys.readouterr().err or rows[0]["correct"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "telepathy"], "unknown strategy 'telepathy'; known strategies: beam_search"),
        (["--budget", "0"], "--budget must be positive"),
        (["--strategy", "greedy", "--beam-width", "3"], "takes no --beam-width"),
        (["--strategy", "greedy", "--stop", "; "], "has no steps"),
        (["--verifier", "fact"], "needs --kb"),
    ],
)
def test_argument_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q: 1+2=?\nA:"}])
    rc = fastpeft_main(["search", "--model", str(tmp_path), "--input", str(inp), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": ""}], "in.jsonl:1: prompt is empty"),
        ([{"prompt": "ok"}, {"question": "x"}], "in.jsonl:2: expected an object with a string 'prompt'"),
        ([], "no requests"),
    ],
)
def test_bad_input_files(tmp_path, capsys, rows, message):
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    rc = fastpeft_main(["search", "--model", str(tmp_path), "--input", str(inp)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1


def test_missing_model_directory(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    rc = fastpeft_main(["search", "--model", str(tmp_path / "nope"), "--input", str(inp)])
    assert rc == 2 and "--model directory not found" in capsys.readouterr().err


def test_adapter_is_loaded_and_changes_the_output(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import fastpeft

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)  # a fresh adapter is a no-op (B = 0); make this one matter
    fastpeft.save_adapter(model, tmp_path / "adapter")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q: 1+2=?\nA:"}])
    texts = []
    for extra in ([], ["--adapter", str(tmp_path / "adapter")]):
        out = tmp_path / f"out{len(texts)}.jsonl"
        rc = fastpeft_main(
            [
                "search",
                "--model",
                str(tiny_model_dir),
                "--input",
                str(inp),
                "--output",
                str(out),
                "--strategy",
                "greedy",
                "--verifier",
                "none",
                "--budget",
                "12",
                "--no-progress",
                *extra,
            ]
        )
        assert rc == 0
        texts.append(json.loads(out.read_text())["text"])
    assert texts[0] != texts[1]


def test_search_with_a_learned_reward_model_on_the_policy_model(tiny_model_dir, tmp_path):
    """--reward_model: a PRM trained by the reward recipe scores as a second adapter; --reward_batch
    scores in the decode batch and gives the same answers."""
    import warnings

    import fastpeft
    from fastpeft.training.model_setup import build_model
    from fastpeft.training.reward_model import RewardConfig, train

    rec = {
        "prompt": "Q: 1+2=?\nA:",
        "answer": "3",
        "response": " 1+2=3; answer 3",
        "step_ends": [0, 8, 16],
        "soft": [0.5, 1.0, 1.0],
        "outcome": 1,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rm = train(
            RewardConfig(
                model=str(tiny_model_dir),
                objective="process",
                train_data=[rec] * 4,
                max_steps=2,
                micro_batch_size=2,
                lora={"r": 2, "lora_alpha": 4},
                output_dir=str(tmp_path / "prm"),
                progress=False,
                plot=False,
                device="cpu",
            )
        )
    policy = build_model(str(tiny_model_dir), None)
    fastpeft.inject(policy, fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    fastpeft.save_adapter(policy, tmp_path / "policy")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Q: 1+2=?\nA:", "answer": "3"}])
    rows = {}
    for flag in ("false", "true"):
        out = tmp_path / f"out-{flag}.jsonl"
        rc = fastpeft_main(
            [
                "search",
                "--model",
                str(tiny_model_dir),
                "--adapter",
                str(tmp_path / "policy"),
                "--reward_model",
                str(rm.saved),
                "--reward_batch",
                flag,
                "--input",
                str(inp),
                "--output",
                str(out),
                "--strategy",
                "beam_search",
                "--n",
                "4",
                "--beam-width",
                "2",
                "--stop",
                "; ",
                "--budget",
                "48",
                "--max-new-tokens",
                "6",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        assert rc == 0
        rows[flag] = json.loads(out.read_text())
        assert 0.0 <= rows[flag]["score"] <= 1.0
    assert rows["true"]["text"] == rows["false"]["text"]
    assert rows["true"]["score"] == pytest.approx(rows["false"]["score"], abs=1e-5)
    rc = fastpeft_main(
        [
            "search",
            "--model",
            str(tiny_model_dir),
            "--input",
            str(inp),
            "--reward_batch",
            "true",
            "--reward_model",
            str(rm.saved),
        ]
    )
    assert rc == 2
