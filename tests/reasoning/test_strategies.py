"""Every strategy on the mock arithmetic model: finds the known answer, respects the budget, ties."""

import pytest

from fastpeft.reasoning.budget import BudgetedGenerator, BudgetExhausted, ComputeBudget
from fastpeft.reasoning.compute_optimal import AllocationPolicy
from fastpeft.reasoning.search import STRATEGIES, search
from fastpeft.reasoning.types import SamplingParams
from fastpeft.reasoning.verifiers import CallableScorer, FormulaVerifier

NUMBERS = [3, 5, 9, 4, 7]
TRUTH = str(sum(NUMBERS))
STEP = "; "  # the mock's (and the bundled task's) step delimiter
OPTIONS = {
    "beam_search": {"n": 8, "beam_width": 4, "stop": STEP},
    "dvts": {"n": 8, "beam_width": 4, "stop": STEP},
    "tree_of_thoughts": {"stop": STEP},
    "mcts": {"stop": STEP},
    "dynamic_allocation": {"stop": STEP},
    "metacognitive": {"measure": "disagreement", "threshold": 0.3, "escalate_options": {"stop": STEP}},
    "compute_optimal": {  # a hand-made allocation: hard prompts (this one) get best-of-N
        "policy": AllocationPolicy(
            [0.5],
            ["greedy", "bon"],
            {"greedy": {"strategy": "greedy", "budget": 10**6}, "bon": {"strategy": "best_of_n", "budget": 10**6}},
        ),
        "difficulty": lambda prompt: 0.9,
    },
}
GUIDED = [
    "best_of_n",
    "weighted_best_of_n",
    "majority_vote",
    "beam_search",
    "dvts",
    "tree_of_thoughts",
    "mcts",
    "dynamic_allocation",
    "metacognitive",
]


def run(mock, strategy, budget=800, unit="tokens", scorer=None, **extra):
    opts = {**OPTIONS.get(strategy, {}), **extra}
    return search(mock, mock.prompt(NUMBERS), strategy, budget, unit, scorer or FormulaVerifier(), **opts)


def test_greedy_follows_the_models_wrong_mode(arithmetic_mock):
    mock = arithmetic_mock(greedy_error_step=1)
    result = run(mock, "greedy")
    assert result.answer == str(sum(NUMBERS) + 1)  # the mock's greedy path adds 1 at step 1
    assert result.score == pytest.approx(0.75)  # 3 of 4 equations hold
    assert result.tokens_spent == mock.tokens_generated > 0 and mock.calls == 1


@pytest.mark.parametrize("strategy", GUIDED)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verifier_guided_strategies_find_the_known_answer(arithmetic_mock, strategy, seed):
    mock = arithmetic_mock(error_rate=0.3, greedy_error_step=1, seed=seed)
    result = run(mock, strategy)
    assert result.answer == TRUTH, (strategy, result.text, result.details)
    assert result.strategy == strategy
    assert result.tokens_spent == mock.tokens_generated <= 800


@pytest.mark.parametrize("unit", ["tokens", "forward_passes"])
@pytest.mark.parametrize("budget", [1, 9, 40, 150])
# swarm needs a multi-part task's parse_parts / integration_prompt: its budget test is in test_swarm.py
@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - {"swarm"}))
def test_every_strategy_stops_within_its_budget(arithmetic_mock, strategy, budget, unit):
    mock = arithmetic_mock(error_rate=0.3, seed=budget)
    result = run(mock, strategy, budget=budget, unit=unit)
    spent = result.tokens_spent if unit == "tokens" else result.forward_passes
    assert spent <= budget
    if budget >= 40:  # enough for a few rows of a few tokens: every strategy must use it
        assert spent > 0 and result.text
    if spent == 0:  # a 1-token budget cannot give each of a step strategy's rows a token
        assert result.answer is None and "budget spent" in result.details["note"]
    assert result.tokens_spent == mock.tokens_generated  # every generated token was charged
    assert result.details["budget"] == budget and result.budget_unit == unit


def test_best_of_n_takes_as_many_samples_as_the_budget_pays_for(arithmetic_mock):
    mock = arithmetic_mock(error_rate=0.3)
    result = run(mock, "best_of_n", budget=200, n=1000, max_new_tokens=40)
    assert len(result.candidates) == 200 // 40  # only full-length samples are started
    assert result.tokens_spent <= 200


@pytest.mark.parametrize(
    "strategy", ["best_of_n", "weighted_best_of_n", "beam_search", "dvts", "tree_of_thoughts", "mcts"]
)
def test_ties_resolve_deterministically(arithmetic_mock, strategy):
    flat = CallableScorer(lambda prompt, response: 0.5)  # every candidate ties
    first = run(arithmetic_mock(error_rate=0.5, seed=7), strategy, scorer=flat, seed=3)
    again = run(arithmetic_mock(error_rate=0.5, seed=7), strategy, scorer=flat, seed=3)
    assert (first.text, first.answer) == (again.text, again.answer)
    if strategy in ("best_of_n", "beam_search", "dvts", "mcts"):
        complete = [c for c in first.candidates if c.complete]
        assert first.text == complete[0].text  # equal scores: the earliest candidate wins


def test_majority_vote_needs_no_scorer_and_reports_its_share(arithmetic_mock):
    mock = arithmetic_mock(error_rate=0.2, seed=1)
    result = search(mock, mock.prompt(NUMBERS), "majority_vote", budget=400, n=9)
    assert result.answer == TRUTH and result.score is None
    assert 0.5 < result.details["vote_share"] <= 1.0


def test_step_level_search_feeds_partial_responses_back(arithmetic_mock):
    mock = arithmetic_mock(error_rate=0.3, seed=0)
    result = run(mock, "beam_search")
    assert result.details["steps"] == len(NUMBERS)  # 4 additions and the answer step
    assert mock.max_rows == 8  # keep 2 prefixes x width 4 per round


def test_budgeted_generator_refuses_when_spent(arithmetic_mock):
    mock = arithmetic_mock()
    gen = BudgetedGenerator(mock, ComputeBudget(10))
    out = gen.generate([mock.prompt(NUMBERS)], SamplingParams(max_new_tokens=64), n=2)
    assert all(c.num_tokens <= 5 for c in out[0])  # 10 tokens over 2 rows
    with pytest.raises(BudgetExhausted, match="budget spent"):
        gen.generate([mock.prompt(NUMBERS)], SamplingParams(), n=1)


def test_generator_that_ignores_max_new_tokens_is_caught():
    from fastpeft.reasoning.types import Completion

    class Overlong:
        def generate(self, prompts, params, n=1, adapters=None):
            return [[Completion("x " * 50, list(range(50)), [-0.1] * 50, "eos") for _ in range(n)] for _ in prompts]

    with pytest.raises(ValueError, match="above max_new_tokens"):
        search(Overlong(), "Q: 1+1=?\nA:", "greedy", budget=100, max_new_tokens=8)
