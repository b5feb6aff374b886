"""Verifier stack (product / weighted mean, failure reporting, timeouts) and learned verifiers."""

import threading
import time

import pytest

from fastpeft.reasoning.search import search
from fastpeft.reasoning.verifiers import CallableScorer, FormulaVerifier, LearnedVerifier, VerifierStack
from fastpeft.reasoning.verifiers.learned import split_steps


def const(value):
    return CallableScorer(lambda prompt, response: value)


class Raising:
    def score(self, prompt, response):
        raise RuntimeError("reward model exploded")


class Slow:
    def __init__(self, seconds):
        self.seconds = seconds
        self.release = threading.Event()

    def score(self, prompt, response):
        self.release.wait(self.seconds)  # returns early once the test releases it
        return 1.0


def test_product_and_weighted_mean():
    stack = VerifierStack({"a": const(0.5), "b": const(0.8), "c": const(1.0)})
    report = stack.evaluate("p", "r")
    assert report.score == pytest.approx(0.4) and report.scores == {"a": 0.5, "b": 0.8, "c": 1.0}
    assert report.problems == []
    weighted = VerifierStack(
        [("a", const(0.5)), ("b", const(0.8))], weights={"a": 3.0, "b": 1.0}, combine="weighted_mean"
    )
    assert weighted.score("p", "r") == pytest.approx((3 * 0.5 + 0.8) / 4)
    geometric = VerifierStack({"a": const(0.25), "b": const(0.5)}, weights={"a": 0.5})
    assert geometric.score("p", "r") == pytest.approx(0.25**0.5 * 0.5)
    assert VerifierStack({"a": const(0.9), "b": const(0.0)}).score("p", "r") == 0.0  # one zero sinks it


def test_raising_verifier_is_reported_and_excluded_by_default():
    stack = VerifierStack({"ok": const(0.6), "boom": Raising()})
    report = stack.evaluate("p", "r")
    assert report.score == pytest.approx(0.6) and "boom" not in report.scores
    (problem,) = report.problems
    assert problem["verifier"] == "boom" and problem["kind"] == "error" and problem["policy"] == "exclude"
    assert "reward model exploded" in problem["message"]
    zero = VerifierStack({"ok": const(0.6), "boom": Raising()}, on_failure="zero")
    assert zero.evaluate("p", "r").score == 0.0 and zero.evaluate("p", "r").scores["boom"] == 0.0
    assert VerifierStack({"boom": Raising()}).score("p", "r") == 0.0  # nobody vouched


def test_out_of_range_score_is_a_reported_failure():
    report = VerifierStack({"bad": const(1.7), "ok": const(0.5)}).evaluate("p", "r")
    assert report.score == 0.5 and report.problems[0]["kind"] == "error"
    assert "outside [0, 1]" in report.problems[0]["message"]


def test_slow_verifier_times_out_and_does_not_block():
    slow = Slow(seconds=5.0)
    stack = VerifierStack({"slow": slow, "fast": const(0.7)}, timeout_s=0.05)
    start = time.perf_counter()
    report = stack.evaluate("p", "r")
    elapsed = time.perf_counter() - start
    slow.release.set()
    assert elapsed < 2.0
    assert report.score == pytest.approx(0.7)
    assert report.problems == [
        {"verifier": "slow", "kind": "timeout", "message": "no answer within 0.05s", "policy": "exclude"}
    ]


def test_stack_problems_reach_the_search_result(arithmetic_mock):
    mock = arithmetic_mock(error_rate=0.0)
    stack = VerifierStack({"formula": FormulaVerifier(), "boom": Raising()})
    result = search(mock, mock.prompt([1, 2, 3]), "best_of_n", budget=200, scorer=stack, n=2)
    assert result.answer == "6" and result.score == 1.0
    problems = result.details["verifier_problems"]
    assert problems and problems[0]["problems"][0]["verifier"] == "boom"


def test_stack_argument_errors():
    with pytest.raises(ValueError, match="at least one"):
        VerifierStack({})
    with pytest.raises(ValueError, match="unknown combine"):
        VerifierStack({"a": const(1.0)}, combine="max")
    with pytest.raises(ValueError, match="unknown verifiers"):
        VerifierStack({"a": const(1.0)}, weights={"b": 1.0})
    with pytest.raises(TypeError, match="no score"):
        VerifierStack({"a": object()})
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierStack({"a": const(1.0)}, timeout_s=0)


def test_split_steps_keeps_delimiters_and_tail():
    assert split_steps("a; b; c", "; ") == ["a; ", "a; b; ", "a; b; c"]
    assert split_steps("a; ", "; ") == ["a; "]
    assert split_steps("", "; ") == [""]


def test_learned_outcome_and_process_modes():
    calls = []

    def prm(prompt, response):
        calls.append(response)
        return 0.2 if "bad" in response.split("; ")[-2 if response.endswith("; ") else -1] else 0.9

    model = CallableScorer(prm)
    outcome = LearnedVerifier(model)
    assert outcome.score("q", "good; bad; good") == 0.9
    process = LearnedVerifier(model, mode="process", step_delimiter="; ")
    assert process.step_scores("q", "good; bad; good") == [0.9, 0.2, 0.9]
    assert process.score("q", "good; bad; good") == 0.2  # min: a chain is as good as its worst step
    last = LearnedVerifier(model, mode="process", step_delimiter="; ", reduce="last")
    assert last.score("q", "good; bad; good") == 0.9
    n = len(calls)
    process.score("q", "good; bad; good")
    assert len(calls) == n  # prefixes are cached
    with pytest.raises(ValueError, match="outside"):
        LearnedVerifier(const(-0.1)).score("q", "r")
    with pytest.raises(ValueError, match="unknown reduce"):
        LearnedVerifier(model, reduce="max")
