"""Process / outcome reward models on step labels: step-boundary extraction, the label loss, the
reward recipe's objective switch, and the search-side scorer on a model shared with the policy."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import fastpeft
from fastpeft.training.model_setup import build_model
from fastpeft.training.reward_model import RewardConfig, train
from fastpeft.training.step_reward_model import (
    StepScorer,
    auc,
    boundary_positions,
    collate_label_rows,
    load_step_scorer,
    pairwise_accuracy,
    step_label_loss,
    tokenize_label_records,
)

PROMPT = "Q: 2+3=?\nA:"


def record(response, soft, outcome, checker=None):
    from fastpeft.training.step_labels import step_ends

    rec = {
        "prompt": PROMPT,
        "answer": "5",
        "response": response,
        "step_ends": step_ends(response),
        "soft": soft,
        "hard": [int(s > 0) for s in soft],
        "outcome": outcome,
    }
    if checker is not None:
        rec["checker"] = checker
    return rec


def records():
    return [
        record(" 2+3=5; answer 5", [0.5, 0.75, 1.0], 1, [1, 1, 1]),
        record(" 2+3=6; answer 6", [0.5, 0.0, 0.0], 0, [1, 0, 0]),
        record(" 2+3=5; answer 6", [0.5, 0.75, 0.0], 0, [1, 1, 0]),
    ]


def test_boundaries_are_the_last_token_of_each_prefix(char_tokenizer):
    text = PROMPT + " 2+3=5; answer 5"
    ids, positions = boundary_positions(char_tokenizer, text, [len(PROMPT), len(PROMPT) + 8, len(text)])
    assert len(ids) == len(text)  # one token per character
    assert [text[p] for p in positions] == [":", " ", "5"] and positions == [
        len(PROMPT) - 1,
        len(PROMPT) + 7,
        len(text) - 1,
    ]
    with pytest.raises(ValueError, match="outside the text"):
        boundary_positions(char_tokenizer, text, [len(text) + 1])


def test_tokenized_records_keep_labels_and_truth(char_tokenizer):
    rows = tokenize_label_records(records(), char_tokenizer, 64)
    assert [r.targets for r in rows] == [[0.5, 0.75, 1.0], [0.5, 0.0, 0.0], [0.5, 0.75, 0.0]]
    assert rows[1].truth == [None, 0, 0]  # checker labels, the bare prompt has none
    outcome = tokenize_label_records(records(), char_tokenizer, 64, objective="outcome")
    assert [r.targets for r in outcome] == [[1.0], [0.0], [0.0]] and outcome[0].positions == rows[0].positions[-1:]
    short = tokenize_label_records(records(), char_tokenizer, len(PROMPT) + 8)  # the answers fall off
    assert [len(r.positions) for r in short] == [2, 2, 2]
    batch = collate_label_rows(rows, 0, torch.device("cpu"))
    assert batch["row"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and batch["target"].shape == (9,)
    with pytest.raises(ValueError, match="lacks \\['soft'\\]"):
        tokenize_label_records([{k: v for k, v in records()[0].items() if k != "soft"}], char_tokenizer, 64)
    with pytest.raises(ValueError, match="2 'soft' labels for 3"):
        tokenize_label_records([{**records()[0], "soft": [1.0, 1.0]}], char_tokenizer, 64)


def test_label_loss_metrics_by_hand():
    z, y = torch.tensor([0.0, 2.0]), torch.tensor([0.5, 1.0])
    expected = (math.log(2) + math.log(1 + math.exp(-2.0))) / 2
    assert float(step_label_loss(z, y)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        step_label_loss(z, torch.tensor([0.5, 1.5]))
    assert auc([0.9, 0.2, 0.5, 0.5], [1, 0, 1, 0]) == pytest.approx((2 + 1.5) / 4)
    assert auc([0.1], [1]) is None
    pw = pairwise_accuracy([0.9, 0.2, 0.9, 0.6, 0.1], [1, 0, 0, 1, 0], ["a", "a", "a", "b", "b"])
    assert pw == {"pairwise_accuracy": (1 + 0.5 + 1) / 3, "pairs": 3}


@pytest.mark.parametrize("objective", ["process", "outcome"])
def test_reward_recipe_trains_on_step_labels(tmp_path, tiny_config, objective):
    data = records() * 4
    config = RewardConfig(
        model_config=tiny_config,
        objective=objective,
        train_data=data,
        eval_data=records(),
        max_steps=8,
        lr=1e-2,
        micro_batch_size=4,
        lora={"r": 4, "lora_alpha": 8},
        output_dir=str(tmp_path / objective),
        progress=False,
        device="cpu",
        plot=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config)
    log = [json.loads(x) for x in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r.get("loss") is not None]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert result.eval["eval_pairs"] == 2 and 0 <= result.eval["eval_pairwise_accuracy"] <= 1
    assert (result.saved / "score_head.safetensors").exists()
    with pytest.raises(ValueError, match="objective"):
        RewardConfig(objective="listwise")


def test_scorer_extracts_step_scores_and_shares_the_policy_model(tmp_path, tiny_config, char_tokenizer):
    config = RewardConfig(
        model_config=tiny_config,
        objective="process",
        train_data=records() * 4,
        max_steps=2,
        lr=1e-2,
        micro_batch_size=4,
        finetune="qlora",
        lora={"r": 4, "lora_alpha": 8},
        output_dir=str(tmp_path / "prm"),
        progress=False,
        device="cpu",
        plot=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config)
    alone = StepScorer(result.model, char_tokenizer)
    response = " 2+3=5; answer 5"
    steps = alone.step_scores(PROMPT, response)
    prefixes = [" 2+3=5; ", response]
    assert steps == pytest.approx(alone.score_batch(PROMPT, prefixes), abs=1e-6)
    assert alone.score(PROMPT, response) == pytest.approx(steps[-1], abs=1e-6)
    assert 0 < alone.prompt_score(PROMPT) < 1

    # one model: a policy adapter (active, what the sampler runs) plus the PRM routed by rows
    shared = build_model(None, tiny_config, seed=0)
    fastpeft.inject(
        shared,
        fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", quantize="nf4"),
        adapter_name="policy",
    )
    for p in shared.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    scorer = load_step_scorer(shared, result.saved, char_tokenizer, adapter_name="prm")
    assert fastpeft.active_adapter(shared) == "policy"
    assert scorer.step_scores(PROMPT, response) == pytest.approx(steps, abs=1e-5)
    assert scorer.score_batch(PROMPT, [*prefixes, " 2+3=6; answer 6"])[:2] == pytest.approx(steps, abs=1e-5)
    assert scorer.forward_rows == 1 + 3
    scorer.score_batch(PROMPT, prefixes)
    assert scorer.forward_rows == 4  # cached
