"""Accuracy-vs-compute machinery on the mock arithmetic model."""

import json

import pytest

from fastpeft.demo.accuracy_vs_compute import (
    DEFAULT_STRATEGIES,
    accuracy_vs_compute,
    format_table,
    save_json,
    save_plot,
)
from fastpeft.reasoning.verifiers import FormulaVerifier

PROBLEMS = [[3, 5, 9], [12, 7, 30, 5], [8, 8, 1]]


def test_every_strategy_at_every_budget(arithmetic_mock, tmp_path):
    mock = arithmetic_mock(error_rate=0.3, greedy_error_step=0, seed=3)
    data = [(mock.prompt(p), str(sum(p))) for p in PROBLEMS]
    budgets = [40, 400]
    rows = accuracy_vs_compute(
        mock,
        data,
        budgets,
        scorer=FormulaVerifier(),
        stop="; ",
        progress=False,
        search_kwargs={"max_new_tokens": 40, "seed": 0},
    )
    assert [(r.strategy, r.budget) for r in rows] == [(s, b) for s in DEFAULT_STRATEGIES for b in budgets]
    by = {(r.strategy, r.budget): r for r in rows}
    for r in rows:
        assert r.total == len(PROBLEMS) and 0 <= r.correct <= r.total
        assert 0 < r.mean_tokens <= r.budget
    assert by[("greedy", 400)].accuracy == 0.0  # the mock's greedy path is wrong by construction
    assert by[("beam_search", 400)].accuracy == 1.0  # the verifier catches every wrong step
    assert by[("best_of_n", 400)].mean_tokens > by[("best_of_n", 40)].mean_tokens  # more compute is spent
    table = format_table(rows)
    assert table.splitlines()[0] == "| strategy | 40 tokens | 400 tokens |" and "| beam_search | " in table
    png = save_plot(rows, tmp_path / "evidence.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(save_json(rows, tmp_path / "evidence.json").read_text())
    assert saved[0]["strategy"] == "greedy" and "accuracy" in saved[0]


def test_labels_options_and_errors(arithmetic_mock):
    mock = arithmetic_mock(error_rate=0.0)
    data = [(mock.prompt([1, 2]), "3")]
    rows = accuracy_vs_compute(
        mock,
        data,
        [200],
        {"wide beam": {"strategy": "beam_search", "n": 4, "beam_width": 2}},
        scorer=FormulaVerifier(),
        stop="; ",
        progress=False,
    )
    assert rows[0].strategy == "wide beam" and rows[0].accuracy == 1.0
    calls = mock.calls
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        accuracy_vs_compute(mock, data, [10], {"nope": {}}, progress=False)
    with pytest.raises(ValueError, match="budgets"):
        accuracy_vs_compute(mock, data, [0], progress=False)
    with pytest.raises(ValueError, match="dataset is empty"):
        accuracy_vs_compute(mock, [], [10], progress=False)
    with pytest.raises(ValueError, match=r"dataset\[0\]"):
        accuracy_vs_compute(mock, [("", "3")], [10], progress=False)
    assert mock.calls == calls  # rejected before any compute
