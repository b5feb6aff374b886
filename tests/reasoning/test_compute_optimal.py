"""Compute-optimal allocation: the per-bin chooser by hand, fitting on a validation table, and the
strategy reproducing a configuration run alone."""

from __future__ import annotations

import pytest

from fastpeft.reasoning.compute_optimal import AllocationPolicy, choose_per_bin, fit_allocation, quantile_edges
from fastpeft.reasoning.search import search

# two bins (easy, hard), three configurations: cheap greedy, mid best-of-4, expensive best-of-16
ACC = [{"greedy": 0.9, "bo4": 0.95, "bo16": 0.96}, {"greedy": 0.2, "bo4": 0.5, "bo16": 0.8}]
TOK = [{"greedy": 50.0, "bo4": 200.0, "bo16": 800.0}, {"greedy": 60.0, "bo4": 240.0, "bo16": 960.0}]


def test_chooser_by_hand():
    # no limit: the most accurate per bin
    assert choose_per_bin(ACC, TOK, [0.5, 0.5]) == (["bo16", "bo16"], pytest.approx(0.88), pytest.approx(880.0))
    # 505 tokens: greedy on easy + bo16 on hard (0.85 for 505) beats bo4 + bo4 (0.725 for 220)
    # and bo16 + bo4 (0.73 for 520, over the limit)
    labels, acc, tok = choose_per_bin(ACC, TOK, [0.5, 0.5], max_mean_tokens=505)
    assert labels == ["greedy", "bo16"] and acc == pytest.approx(0.85) and tok == pytest.approx(505)
    # 200 tokens: greedy + bo4 = 0.7 for 145 (bo4 + greedy = 0.575 for 130 is worse)
    assert choose_per_bin(ACC, TOK, [0.5, 0.5], max_mean_tokens=200)[0] == ["greedy", "bo4"]
    # unequal weights change the answer: with 90% hard questions bo16 on hard costs 864 > 505, so
    # hard gets bo4 (216) and the few easy questions can afford bo16 (80): 0.546 for 296
    labels, acc, tok = choose_per_bin(ACC, TOK, [0.1, 0.9], max_mean_tokens=505)
    assert labels == ["bo16", "bo4"] and acc == pytest.approx(0.546) and tok == pytest.approx(296)
    with pytest.raises(ValueError, match="no configuration fits"):
        choose_per_bin(ACC, TOK, [0.5, 0.5], max_mean_tokens=10)
    with pytest.raises(ValueError, match="same non-empty labels"):
        choose_per_bin([{"a": 1.0}], [{"b": 1.0}], [1.0])


def test_chooser_ties_prefer_fewer_tokens():
    acc = [{"a": 1.0, "b": 1.0}]
    assert choose_per_bin(acc, [{"a": 100.0, "b": 10.0}], [1.0])[0] == ["b"]


def test_quantile_edges_and_fit():
    assert quantile_edges([0.1, 0.9, 0.5, 0.3], 2) == [0.5]
    with pytest.raises(ValueError, match="cannot fill"):
        quantile_edges([0.1], 2)
    difficulty = [0.1, 0.2, 0.8, 0.9]
    correct = {"greedy": [1, 1, 0, 0], "bo16": [1, 1, 1, 0]}
    tokens = {"greedy": [50, 50, 60, 60], "bo16": [800, 800, 900, 900]}
    configs = {
        "greedy": {"strategy": "greedy", "budget": 64},
        "bo16": {"strategy": "best_of_n", "budget": 1024, "n": 16},
    }
    policy = fit_allocation(difficulty, correct, tokens, configs, bins=2)
    assert policy.edges == [0.8] and policy.choices == ["greedy", "bo16"]
    assert policy.expected_accuracy == pytest.approx(0.75) and policy.expected_tokens == pytest.approx(475)
    assert policy.config_for(0.85) == ("bo16", configs["bo16"])
    assert AllocationPolicy.from_json(policy.to_json()) == policy
    with pytest.raises(ValueError, match="4 outcomes"):
        fit_allocation(difficulty, {"greedy": [1]}, tokens, configs)
    with pytest.raises(ValueError, match="no configuration"):
        AllocationPolicy([0.5], ["greedy", "beam"], configs)


def test_strategy_runs_the_bins_configuration_as_it_runs_alone(arithmetic_mock):
    fresh = lambda: arithmetic_mock(error_rate=0.4, seed=1)  # noqa: E731 - the mock seeds from its call count
    scorer = type("Half", (), {"score": lambda self, p, r: 0.5})()
    configs = {
        "greedy": {"strategy": "greedy", "budget": 64, "max_new_tokens": 48},
        "bo8": {"strategy": "majority_vote", "budget": 512, "n": 8, "max_new_tokens": 48},
    }
    policy = AllocationPolicy([0.5], ["greedy", "bo8"], configs)
    prompt = "Q: 3+5+9+4=?\nA:"
    for value, label in ((0.2, "greedy"), (0.7, "bo8")):
        got = search(
            fresh(),
            prompt,
            "compute_optimal",
            budget=4096,
            scorer=scorer,
            seed=5,
            policy=policy,
            difficulty=lambda p, v=value: v,
        )
        cfg = configs[label]
        alone = search(
            fresh(),
            prompt,
            cfg["strategy"],
            budget=cfg["budget"],
            scorer=scorer,
            seed=5,
            max_new_tokens=48,
            **({"n": 8} if label == "bo8" else {}),
        )
        assert got.details["chosen"] == label and got.strategy == "compute_optimal"
        assert (got.answer, got.text, got.tokens_spent) == (alone.answer, alone.text, alone.tokens_spent)
        assert got.tokens_spent <= cfg["budget"]
    probed = search(
        fresh(),
        prompt,
        "compute_optimal",
        budget=4096,
        scorer=scorer,
        seed=5,
        policy=policy,
        probe_samples=2,
        max_new_tokens=48,
    )
    assert probed.details["difficulty"] == pytest.approx(0.5) and probed.details["chosen"] == "bo8"
    with pytest.raises(ValueError, match="exactly one"):
        search(fresh(), prompt, "compute_optimal", budget=256, scorer=scorer, policy=policy)
