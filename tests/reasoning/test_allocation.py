"""Difficulty estimation, routing thresholds, outcome history, meta-cognitive escalation."""

import pytest

from fastpeft.reasoning.allocation import (
    DifficultyEstimator,
    OutcomeHistory,
    answer_disagreement,
    mean_token_entropy,
    route,
)
from fastpeft.reasoning.search import search
from fastpeft.reasoning.types import Completion
from fastpeft.reasoning.verifiers import FormulaVerifier


@pytest.mark.parametrize(
    ("difficulty", "expected"),
    [
        (0.0, "greedy"),
        (0.29, "greedy"),
        (0.3, "beam_search"),
        (0.69, "beam_search"),
        (0.7, "mcts"),
        (1.0, "mcts"),
    ],
)
def test_default_thresholds(difficulty, expected):
    assert route(difficulty) == expected


def test_thresholds_are_configurable_and_checked():
    assert route(0.5, low=0.6, high=0.9) == "greedy"
    assert route(0.5, low=0.1, high=0.4) == "mcts"
    with pytest.raises(ValueError, match="low <= high"):
        route(0.5, low=0.8, high=0.2)
    with pytest.raises(ValueError, match="difficulty"):
        route(1.5)


def test_features_rise_with_length_structure_domain_and_ambiguity():
    est = DifficultyEstimator(domain_terms=["myocardial", "infarction", "troponin"])
    easy = est.features("What is 2+2?")
    hard = est.features(
        "Given troponin levels after a myocardial infarction, which of these might "
        "roughly explain it, maybe (3*(4+5))/2 times each dose? or that? " * 2
    )
    for name in ("length", "structure", "domain", "ambiguity"):
        assert hard[name] > easy[name], name
    assert easy["history"] is None  # no history: left out of the mean
    assert (
        est.estimate("What is 2+2?")
        < 0.3
        <= 0.7
        <= est.estimate(
            "Given troponin levels after a myocardial infarction, which of these might roughly explain it, maybe "
            "(3*(4+5))/2 times each dose? or that? " * 3
        )
    )


def test_history_lookup_and_its_effect():
    history = OutcomeHistory([("Q: 12+7=?", True), ("Q: 31+45=?", True), ("Q: 98+76+54+32=?", False)])
    near = history.similar("Q: 40+2=?")
    assert near[0] == (1.0, True) and all(ok for _, ok in near)  # same shape as "12+7"
    assert history.accuracy_near("Q: 40+2=?") == 1.0
    assert history.similar("Q: 11+22+33+44=?")[0] == (1.0, False)  # same shape as the failed one
    assert history.accuracy_near("Q: 11+22+33+44=?") < 0.5
    assert history.accuracy_near("explain the causes of the french revolution") is None
    only_history = {"history": 1.0}
    assert DifficultyEstimator(history=history, weights=only_history).estimate("Q: 40+2=?") == 0.0
    assert DifficultyEstimator(history=history, weights=only_history).estimate("Q: 11+22+33+44=?") > 0.5
    with pytest.raises(ValueError, match="unknown difficulty features"):
        DifficultyEstimator(weights={"vibes": 1.0})


@pytest.mark.parametrize(
    ("numbers", "routed"),
    [
        ([2, 3], "greedy"),
        ([3, 5, 9], "beam_search"),
        ([11, 22, 33, 44, 55, 66, 77], "mcts"),
    ],
)
def test_dynamic_allocation_routes_by_difficulty_and_answers(arithmetic_mock, numbers, routed):
    mock = arithmetic_mock(error_rate=0.2, seed=5)
    # arithmetic prompts differ in structure and length only, so the estimate uses those
    estimator = DifficultyEstimator(weights={"structure": 1.0, "length": 0.2})
    result = search(
        mock,
        mock.prompt(numbers),
        "dynamic_allocation",
        budget=3000,
        scorer=FormulaVerifier(),
        stop="; ",
        estimator=estimator,
    )
    assert result.details["routed_to"] == routed and result.strategy == "dynamic_allocation"
    assert result.answer == str(sum(numbers))
    assert result.details["difficulty"] == pytest.approx(estimator.estimate(mock.prompt(numbers)))


def test_entropy_and_disagreement_measures():
    comps = [Completion("a", [1, 2], [-0.5, -1.5], "eos"), Completion("b", [3], [-1.0], "eos")]
    assert mean_token_entropy(comps) == pytest.approx(1.0)
    assert mean_token_entropy([]) == 0.0
    assert answer_disagreement(["85", "85.0", "84"]) == pytest.approx(1 / 3)
    assert answer_disagreement([None, None]) == 1.0
    with pytest.raises(ValueError):
        answer_disagreement([])


def test_confident_model_answers_fast(arithmetic_mock):
    mock = arithmetic_mock(error_rate=0.0, token_logprob=-0.05)
    result = search(
        mock,
        mock.prompt([4, 5, 6]),
        "metacognitive",
        budget=2000,
        scorer=FormulaVerifier(),
        probe_samples=2,
        threshold=0.5,
        escalate_options={"stop": "; "},
    )
    assert result.details["escalated"] is False and result.answer == "15"
    assert mock.calls == 1  # the probe only


def test_uncertain_model_escalates(arithmetic_mock):
    mock = arithmetic_mock(error_rate=0.3, token_logprob=-1.2, seed=2)
    result = search(
        mock,
        mock.prompt([4, 5, 6, 7]),
        "metacognitive",
        budget=2000,
        scorer=FormulaVerifier(),
        probe_samples=2,
        threshold=0.5,
        escalate_to="beam_search",
        stop="; ",
        escalate_options={"n": 6, "beam_width": 3},
    )
    assert result.details["escalated"] is True and result.details["escalated_to"] == "beam_search"
    assert result.details["uncertainty"] > 0.5
    assert result.answer == "22" and result.tokens_spent == mock.tokens_generated <= 2000


def test_metacognitive_errors(arithmetic_mock):
    mock = arithmetic_mock()
    with pytest.raises(ValueError, match="unknown escalation strategy 'wizard'"):
        search(mock, mock.prompt([1, 2]), "metacognitive", escalate_to="wizard")
    with pytest.raises(ValueError, match="measure"):
        search(mock, mock.prompt([1, 2]), "metacognitive", measure="vibes")
