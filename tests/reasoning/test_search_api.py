"""The one search API: registry, argument errors, adapters, seeds."""

import pytest

from fastpeft.reasoning.search import STRATEGIES, register_strategy, search, search_many, strategy_options
from fastpeft.reasoning.strategy_base import make_result
from fastpeft.reasoning.verifiers import FormulaVerifier

PROMPT = "Q: 3+4=?\nA:"


def test_registry_lists_every_strategy_of_the_issue():
    assert {
        "greedy",
        "sampling",
        "best_of_n",
        "weighted_best_of_n",
        "majority_vote",
        "beam_search",
        "dvts",
        "tree_of_thoughts",
        "mcts",
        "dynamic_allocation",
        "metacognitive",
    } <= set(STRATEGIES)
    assert "beam_width" in strategy_options("beam_search") and strategy_options("greedy") == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompt": ""}, ValueError, "prompt is empty"),
        ({"prompt": "   \n"}, ValueError, "prompt is empty"),
        ({"prompt": None}, TypeError, "prompt must be a str"),
        ({"budget": 0}, ValueError, "budget must be positive"),
        ({"budget": -5}, ValueError, "budget must be positive"),
        ({"budget": 2.5}, TypeError, "budget must be an int"),
        ({"budget_unit": "joules"}, ValueError, "known units: tokens, forward_passes"),
        ({"strategy": "telepathy"}, ValueError, "known strategies: beam_search, best_of_n, dvts"),
        ({"strategy": "greedy", "beam_width": 3}, TypeError, r"has no option\(s\) \['beam_width'\]"),
        ({"temperature": -1.0}, ValueError, "temperature must be >= 0"),
        ({"strategy": "beam_search", "n": 6, "beam_width": 4}, ValueError, "multiple of beam_width"),
        ({"strategy": "best_of_n", "scorer": None}, ValueError, "needs a scorer"),
        ({"strategy": "best_of_n", "aggregate": "median"}, ValueError, "unknown aggregate"),
    ],
)
def test_bad_input_gets_a_clear_error(arithmetic_mock, kwargs, error, match):
    call = {"prompt": PROMPT, "strategy": "best_of_n", "budget": 100, "scorer": FormulaVerifier(), **kwargs}
    mock = arithmetic_mock()
    with pytest.raises(error, match=match):
        search(mock, call.pop("prompt"), call.pop("strategy"), **call)
    assert mock.calls == 0  # rejected before any compute


def test_adapter_name_reaches_the_generator(arithmetic_mock):
    seen = []
    mock = arithmetic_mock()
    inner = mock.generate

    def spy(prompts, params, n=1, adapters=None):
        seen.append(adapters)
        return inner(prompts, params, n=n, adapters=adapters)

    mock.generate = spy
    search(mock, PROMPT, "greedy", budget=50, adapter="math")
    search(mock, PROMPT, "greedy", budget=50)
    assert seen == ["math", None]


def test_seeded_runs_repeat_and_prompts_get_their_own_seeds(arithmetic_mock):
    seeds = []
    mock = arithmetic_mock(error_rate=0.5)
    inner = mock.generate

    def spy(prompts, params, n=1, adapters=None):
        seeds.append(params.seed)
        return inner(prompts, params, n=n, adapters=adapters)

    mock.generate = spy
    results = search_many(
        mock, [PROMPT, "Q: 1+1=?\nA:"], "best_of_n", progress=False, budget=100, scorer=FormulaVerifier(), seed=7, n=2
    )
    assert len(results) == 2 and seeds[0] == 7 and 7 + 1_000_003 in seeds  # call k adds k
    a = search(arithmetic_mock(error_rate=0.5), PROMPT, "best_of_n", 300, scorer=FormulaVerifier(), seed=1)
    b = search(arithmetic_mock(error_rate=0.5), PROMPT, "best_of_n", 300, scorer=FormulaVerifier(), seed=1)
    assert [c.text for c in a.candidates] == [c.text for c in b.candidates]


def test_register_a_custom_strategy(arithmetic_mock):
    def first_token_only(generator, prompt, scorer, params, shout: bool = False):
        from fastpeft.reasoning.strategy_base import Candidate

        text = generator.generate([prompt], params.__class__(max_new_tokens=1), n=1)[0][0].text
        cand = Candidate(text.upper() if shout else text, None, None, False)
        return make_result("first_token_only", prompt, cand, [cand], generator.budget)

    register_strategy("first_token_only", first_token_only)
    try:
        result = search(arithmetic_mock(), PROMPT, "first_token_only", budget=5, shout=True)
        assert result.tokens_spent == 1 and result.strategy == "first_token_only"
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("first_token_only", first_token_only)
        with pytest.raises(TypeError, match="must take"):
            register_strategy("bad", lambda prompt, generator: None)
    finally:
        STRATEGIES.pop("first_token_only")


def test_result_serialises(arithmetic_mock):
    result = search(arithmetic_mock(), PROMPT, "best_of_n", budget=100, scorer=FormulaVerifier(), n=2)
    row = result.to_dict()
    assert {"answer", "score", "strategy", "tokens_spent", "forward_passes", "details"} <= set(row)
    assert "candidates" not in row and len(result.to_dict(with_candidates=True)["candidates"]) == 2
