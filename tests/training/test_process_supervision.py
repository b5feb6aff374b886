"""Process supervision for GRPO: tokens mapped to steps, advantages by hand, and a GRPO run whose
per-token advantages come from step scores."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest
import torch

from fastpeft.demo.arithmetic import make_arithmetic_dataset
from fastpeft.training.grpo import GRPOConfig, train
from fastpeft.training.process_supervision import ProcessSupervisionReward, process_advantages, token_step_index


def test_tokens_map_to_the_step_that_ends_at_or_after_them():
    # "ab; cd" + EOS: steps end at 4 ("ab; ") and 6 ("cd")
    assert token_step_index(["a", "b", ";", " ", "c", "d", "</s>"], [4, 6]) == [0, 0, 0, 0, 1, 1, 1]
    assert token_step_index(["ab;", " c", "d"], [4, 6]) == [0, 1, 1]  # " c" holds character 4: step 1
    assert token_step_index(["x"], []) == [-1]


def test_advantages_by_hand():
    # one group of two completions: rewards [1, 0] and [1]; pooled mean 2/3, std sqrt(2)/3
    adv = process_advantages([[1.0, 0.0], [1.0]], [[0, 0, 1, -1], [0, 0]], 2, width=5, eps=0.0)
    mean, std = 2 / 3, math.sqrt(2) / 3
    hi, lo = (1 - mean) / std, (0 - mean) / std
    expected = torch.tensor([[hi + lo, hi + lo, lo, 0, 0], [hi, hi, 0, 0, 0]], dtype=torch.float32)
    assert torch.allclose(adv, expected, atol=1e-6)
    # an invalid completion is left out of the statistics and gets no advantage
    adv = process_advantages([[1.0, 0.0], [5.0]], [[0, 1], [0]], 2, width=2, valid=torch.tensor([True, False]))
    assert adv[1].abs().sum() == 0 and adv[0, 0] == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="groups of 3"):
        process_advantages([[1.0]] * 2, [[0]] * 2, 3, width=1)


class DigitPRM:
    """A stand-in PRM: a step scores its share of digit characters (a dense, learnable signal)."""

    def step_scores(self, prompt, response):
        from fastpeft.training.step_labels import step_ends

        ends = step_ends(response)
        return [sum(ch.isdigit() for ch in response[a:b]) / max(b - a, 1) for a, b in itertools.pairwise(ends)]


def test_grpo_trains_on_process_advantages(tmp_path, tiny_config, char_tokenizer):
    records = make_arithmetic_dataset(8, seed=2)
    config = GRPOConfig(
        model_config=tiny_config,
        train_data=records,
        max_steps=2,
        prompts_per_step=2,
        num_generations=4,
        max_new_tokens=12,
        max_seq_len=64,
        lr=1e-2,
        beta=0.0,
        lora={"r": 4, "lora_alpha": 8},
        output_dir=str(tmp_path / "grpo"),
        progress=False,
        plot=False,
        device="cpu",
        eval_at_start=False,
    )
    reward = ProcessSupervisionReward(DigitPRM(), char_tokenizer)
    seen = []
    original = reward.token_advantages

    def spy(batch, valid, group_size):
        adv = original(batch, valid, group_size)
        seen.append((adv.shape, tuple(batch.completion_mask.shape), float(adv.abs().sum())))
        return adv

    reward.token_advantages = spy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config, reward=reward)
    assert len(seen) == 2 and all(shape == mask for shape, mask, _ in seen) and any(s > 0 for *_, s in seen)
    log = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "reward_prm" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert result.history[-1]["grad_norm"] > 0
