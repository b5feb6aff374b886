"""MCTS: UCT and backpropagation arithmetic on a hand-built tree, then the search on the mock."""

import math

import pytest

from fastpeft.reasoning.mcts import Node, backpropagate, select_child, select_leaf, uct
from fastpeft.reasoning.search import search
from fastpeft.reasoning.verifiers import FormulaVerifier


def hand_built_tree():
    root = Node("")
    a, b = root.add_child("a"), root.add_child("b")
    a1, a2 = a.add_child("a1"), a.add_child("a2")
    backpropagate(a1, 1.0)
    backpropagate(a2, 0.0)
    backpropagate(b, 0.5)
    return root, a, b, a1, a2


def test_backpropagation_accumulates_visits_and_reward_up_to_the_root():
    root, a, b, a1, a2 = hand_built_tree()
    assert [(n.visits, n.value_sum) for n in (root, a, b, a1, a2)] == [(3, 1.5), (2, 1.0), (1, 0.5), (1, 1.0), (1, 0.0)]
    assert a.mean_value == 0.5 and root.mean_value == 0.5 and a2.depth == 2


def test_uct_values_by_hand():
    # a: 1.0/2 + 1.4 * sqrt(ln 3 / 2);  b: 0.5/1 + 1.4 * sqrt(ln 3 / 1)
    assert uct(1.0, 2, 3, 1.4) == pytest.approx(0.5 + 1.4 * 0.7411516, rel=1e-6)  # sqrt(1.0986123 / 2)
    assert uct(0.5, 1, 3, 1.4) == pytest.approx(0.5 + 1.4 * 1.0481470, rel=1e-6)
    assert uct(0.0, 0, 3, 1.4) == math.inf  # unvisited children go first
    assert uct(2.0, 4, 1, 1.0) == 0.5  # ln 1 = 0: pure exploitation


def test_selection_explores_the_less_visited_child_then_exploits_with_c_zero():
    root, a, b, *_ = hand_built_tree()
    assert select_child(root, 1.4) is b  # same mean, fewer visits
    assert select_child(root, 0.0) is a  # tie on mean value: the earliest child
    backpropagate(b, 1.0)  # b: 2 visits, mean 0.75
    assert select_child(root, 0.0) is b
    fresh = root.add_child("c")
    assert select_child(root, 0.0) is fresh  # unvisited: +inf


def test_select_leaf_skips_and_marks_exhausted_subtrees():
    root, a, b, a1, a2 = hand_built_tree()
    a1.exhausted = a2.exhausted = True
    assert select_leaf(root, 0.0) is b  # a has nothing left, so it is marked and skipped
    assert a.exhausted
    b.exhausted = True
    assert select_leaf(root, 0.0) is None and root.exhausted


@pytest.mark.parametrize("rollout", ["value", "full"])
def test_mcts_finds_the_answer_with_either_evaluation(arithmetic_mock, rollout):
    mock = arithmetic_mock(error_rate=0.3, greedy_error_step=1, seed=4)
    numbers = [12, 7, 30, 5]
    result = search(
        mock,
        mock.prompt(numbers),
        "mcts",
        budget=1500,
        scorer=FormulaVerifier(),
        stop="; ",
        rollout=rollout,
        max_depth=5,
    )
    assert result.answer == str(sum(numbers))
    assert result.details["iterations"] <= 64 and result.details["root_visits"] >= result.details["iterations"]
    assert result.tokens_spent == mock.tokens_generated <= 1500


def test_mcts_stops_when_the_tree_is_exhausted(arithmetic_mock):
    mock = arithmetic_mock(error_rate=0.0, seed=0)
    result = search(
        mock, mock.prompt([2, 3]), "mcts", budget=10_000, scorer=FormulaVerifier(), stop="; ", expand=2, rollout="value"
    )
    # "2+3=5; " then "answer 5": two levels of two children each, all terminal
    assert result.details["tree_exhausted"] and result.details["iterations"] == 3
    assert result.answer == "5" and result.tokens_spent < 10_000


def test_mcts_argument_errors(arithmetic_mock):
    mock = arithmetic_mock()
    with pytest.raises(ValueError, match="rollout must be"):
        search(mock, mock.prompt([1, 2]), "mcts", scorer=FormulaVerifier(), rollout="random")
    with pytest.raises(ValueError, match="needs a scorer"):
        search(mock, mock.prompt([1, 2]), "mcts")
    with pytest.raises(ValueError, match="expand, max_depth"):
        search(mock, mock.prompt([1, 2]), "mcts", scorer=FormulaVerifier(), expand=0)
