"""Outcome, multi-objective and process rewards; failing rewards skip samples instead of crashing."""

import math
import warnings

import pytest
import torch

import fastpeft
from fastpeft.demo.arithmetic import make_arithmetic_dataset
from fastpeft.training.model_setup import build_model
from fastpeft.training.reward_model import ScalarHeadModel
from fastpeft.training.rewards import MultiObjectiveReward, answer_format_reward, arithmetic_reward, build_reward
from fastpeft.training.rewards.process import (
    ProcessRewardModel,
    StepCheckerReward,
    split_steps,
    train_process_reward_model,
)
from fastpeft.training.tokenizer import load_char_tokenizer

RECORD = {"prompt": "Q: 47+38=?\nA:", "answer": "85"}
RIGHT = " 7+8=15 write 5 carry 1; 4+3+1=8; answer 85"


def test_outcome_rewards_use_the_task_answer():
    assert arithmetic_reward(RECORD["prompt"], RIGHT, RECORD) == 1.0
    assert arithmetic_reward(RECORD["prompt"], RIGHT.replace("85", "86"), RECORD) == 0.0
    assert arithmetic_reward("", "answer 1,000", {"answer": 1000}) == 1.0
    assert answer_format_reward("", "no number here", {}) == 0.0 and answer_format_reward("", "answer 3", {}) == 1.0
    with pytest.raises(KeyError, match="answer"):
        arithmetic_reward("", RIGHT, {})


def test_weighted_sum_of_objectives():
    reward = MultiObjectiveReward({"a": lambda p, c, r: 1.0, "b": lambda p, c, r: len(c)}, {"a": 0.5, "b": 2.0})
    batch = reward(["p", "p"], ["xy", "xyz"], [{}, {}])
    assert batch.totals == [0.5 + 2 * 2, 0.5 + 2 * 3]
    assert batch.components == {"a": [1.0, 1.0], "b": [2.0, 3.0]} and batch.num_skipped == 0


def test_failing_rewards_skip_samples_with_a_warning():
    def flaky(p, c, r):
        if c == "raise":
            raise RuntimeError("verifier crashed")
        return {"nan": math.nan, "none": None, "inf": math.inf, "text": "high"}.get(c, 1.0)

    reward = MultiObjectiveReward({"flaky": flaky, "one": lambda p, c, r: 1.0})
    completions = ["ok", "raise", "nan", "none", "inf", "text", "ok"]
    with pytest.warns(RuntimeWarning, match=r"'flaky' failed on 5/7 samples \(first: RuntimeError: verifier crashed"):
        batch = reward(["p"] * 7, completions, [{}] * 7)
    assert batch.totals == [2.0, None, None, None, None, None, 2.0]
    assert batch.failures == {"flaky": 5, "one": 0} and batch.num_skipped == 5
    t = batch.tensor()
    assert t[0] == 2.0 and torch.isnan(t[1:6]).all() and batch.valid().tolist() == [True] + [False] * 5 + [True]
    assert batch.summary()["reward_mean"] == 2.0 and batch.summary()["reward_skipped"] == 5


def test_batch_reward_falls_back_to_samples_when_the_batch_call_fails():
    class Batchy:
        def score_batch(self, prompts, completions, records):
            raise RuntimeError("pool died")

        def __call__(self, p, c, r):
            if c == "bad":
                raise ValueError("bad sample")
            return 0.25

    with pytest.warns(RuntimeWarning):
        batch = MultiObjectiveReward({"b": Batchy()})(["p"] * 3, ["a", "bad", "c"])
    assert batch.totals == [0.25, None, 0.25]


def test_build_reward_and_config_errors():
    reward = build_reward({"arithmetic": 1.0, "format": 0.1})
    batch = reward([RECORD["prompt"]], [RIGHT], [RECORD])
    assert batch.totals == [pytest.approx(1.1)]
    with pytest.raises(ValueError, match="unknown reward"):
        build_reward(["accuracy"])
    with pytest.raises(ValueError, match="weights given for unknown"):
        MultiObjectiveReward({"a": arithmetic_reward}, {"b": 1.0})
    with pytest.raises(TypeError, match="detector"):
        MultiObjectiveReward({"a": arithmetic_reward}, detector=object())


def test_step_checkers_score_each_step_with_configurable_weights():
    reward = StepCheckerReward()
    assert split_steps(RIGHT) == ["7+8=15 write 5 carry 1", "4+3+1=8", "answer 85"]
    assert reward.step_scores("", RIGHT) == [1.0, 1.0, 1.0]
    wrong = " 7+8=14 write 5 carry 1; 4+3+1=8; answer 85"
    # first step: parses (0.3) but 7+8 != 14 (fact 0.2 lost) and 14 does not write 5 (coherence 0.5 lost)
    assert reward.step_scores("", wrong) == pytest.approx([0.3, 1.0, 1.0])
    assert reward("", wrong, {}) == pytest.approx((0.3 + 1 + 1) / 3)
    assert reward.step_labels("", wrong) == [0, 1, 1]
    no_carry = " 7+8=15; 4+3=7; answer 75"  # true equation, forgotten carry: only coherence fails
    assert reward.step_scores("", no_carry)[0] == pytest.approx(0.5)
    only_fact = StepCheckerReward(weights={"syntax": 0.0, "coherence": 0.0, "fact": 1.0}, reduce="min")
    assert only_fact("", no_carry) == 1.0 and only_fact("", wrong) == 0.0
    assert StepCheckerReward()("", "", {}) == 0.0


def _prm_records(n: int) -> list[dict]:
    checker = StepCheckerReward()
    records = []
    for i, r in enumerate(make_arithmetic_dataset(n, seed=3)):
        completion = r["completion"]
        if i % 2:  # corrupt the first column sum
            head, _, rest = completion.partition("=")
            digits = "".join(ch for ch in rest.split()[0] if ch.isdigit()) or "0"
            completion = f"{head}={int(digits) + 1}{rest[len(rest.split()[0]) :]}"
        steps = split_steps(completion)
        records.append({"prompt": r["prompt"], "steps": steps, "labels": checker.step_labels(r["prompt"], completion)})
    return records


def test_process_reward_model_trains_on_step_labels(tiny_config):
    torch.manual_seed(0)
    tok = load_char_tokenizer()
    lm = build_model(None, tiny_config, seed=0)
    fastpeft.inject(lm, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    prm = ProcessRewardModel(ScalarHeadModel(lm), tok)
    records = _prm_records(16)
    assert {lab for r in records for lab in r["labels"]} == {0, 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = train_process_reward_model(prm, records, steps=25, lr=1e-2, batch_size=8)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    scores = prm.step_scores(records[0]["prompt"], "; ".join(records[0]["steps"]))
    assert len(scores) == len(records[0]["steps"]) and all(0.0 <= s <= 1.0 for s in scores)
    assert 0.0 <= prm.score(records[0]["prompt"], " 7+8=15") <= 1.0
