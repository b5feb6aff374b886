"""Reward model: a few Bradley-Terry steps on a tiny LoRA model; loss moves, outputs are saved and
reload to the same scores."""

import json
import warnings

import pytest
import torch

from fastpeft.demo.arithmetic import make_arithmetic_dataset
from fastpeft.training.model_setup import build_model
from fastpeft.training.reward_model import RewardConfig, RewardScorer, last_token_scores, load_reward_model, train
from fastpeft.training.tokenizer import load_char_tokenizer


def pairs(n: int, seed: int) -> list[dict]:
    out = []
    for r in make_arithmetic_dataset(n, seed=seed):
        wrong = str(int(r["answer"]) + 7)
        rejected = r["completion"].replace(f"answer {r['answer']}", f"answer {wrong}")
        out.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": rejected, "margin": 0.5})
    return out


def test_last_token_scores_handles_both_padding_sides():
    scores = torch.arange(12.0).view(2, 6)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    assert last_token_scores(scores, right).tolist() == [2.0, 11.0]
    assert last_token_scores(scores, left).tolist() == [5.0, 10.0]


def test_reward_model_trains_saves_and_reloads(tmp_path, tiny_config):
    config = RewardConfig(
        model_config=tiny_config,
        train_data=pairs(16, 1),
        eval_data=pairs(8, 2),
        max_steps=6,
        lr=5e-3,
        micro_batch_size=8,
        centering_coef=0.01,
        lora={"r": 4, "lora_alpha": 8},
        output_dir=str(tmp_path / "rm"),
        progress=False,
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config)
    records = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert 0.0 <= result.eval["eval_accuracy"] <= 1.0 and result.eval["eval_pairs"] == 8
    assert (tmp_path / "rm" / "loss.png").exists()
    saved = tmp_path / "rm" / "adapter"
    assert (saved / "adapter_model.safetensors").exists() and (saved / "score_head.safetensors").exists()

    tok = load_char_tokenizer()
    prompt, response = config.train_data[0]["prompt"], config.train_data[0]["chosen"]
    before = RewardScorer(result.model, tok).raw(prompt, response)
    reloaded = load_reward_model(build_model(None, tiny_config, seed=0), saved)
    after = RewardScorer(reloaded, tok)
    assert after.raw(prompt, response) == pytest.approx(before, abs=1e-5)
    assert 0.0 < after.score(prompt, response) < 1.0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="centering_coef"):
        RewardConfig(centering_coef=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        RewardConfig(max_steps=0)
