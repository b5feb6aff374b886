"""The one search API: ``search(generator, prompt, strategy=..., budget=...)`` and the strategy registry.

Every strategy runs against the same compute budget (generated tokens, or generator forward passes)
through a :class:`BudgetedGenerator`, stops when it is spent, and reports what it spent, so results
at equal budgets compare strategies at equal compute.

>>> result = search(generator, "Q: 17 + 25 = ?", strategy="beam_search", budget=2048,
...                 scorer=FormulaVerifier(), n=8, beam_width=4)      # doctest: +SKIP
>>> result.answer, result.score, result.tokens_spent                   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from fastpeft.reasoning.allocation import dynamic_allocation, metacognitive
from fastpeft.reasoning.beam import beam_search, dvts
from fastpeft.reasoning.best_of_n import best_of_n, greedy, majority_vote, sampling, weighted_best_of_n
from fastpeft.reasoning.budget import BudgetedGenerator, BudgetUnit, ComputeBudget
from fastpeft.reasoning.compute_optimal import compute_optimal
from fastpeft.reasoning.mcts import mcts
from fastpeft.reasoning.strategy_base import SearchResult, check_prompt
from fastpeft.reasoning.swarm import swarm
from fastpeft.reasoning.tree_of_thoughts import tree_of_thoughts
from fastpeft.reasoning.types import Generator, SamplingParams, Scorer

StrategyFn = Callable[..., SearchResult]
# the fixed leading parameters every strategy takes; anything after them is a strategy option
_COMMON = ("generator", "prompt", "scorer", "params")

STRATEGIES: dict[str, StrategyFn] = {
    "greedy": greedy,
    "sampling": sampling,
    "best_of_n": best_of_n,
    "weighted_best_of_n": weighted_best_of_n,
    "majority_vote": majority_vote,
    "beam_search": beam_search,
    "dvts": dvts,
    "tree_of_thoughts": tree_of_thoughts,
    "mcts": mcts,
    "dynamic_allocation": dynamic_allocation,
    "metacognitive": metacognitive,
    "compute_optimal": compute_optimal,
    "swarm": swarm,
}


def register_strategy(name: str, fn: StrategyFn) -> None:
    """Add a strategy ``fn(generator, prompt, scorer, params, **options) -> SearchResult``."""
    if name in STRATEGIES:
        raise ValueError(f"strategy {name!r} is already registered")
    params = list(inspect.signature(fn).parameters)
    if tuple(params[:4]) != _COMMON:
        raise TypeError(f"strategy {name!r} must take {_COMMON} first, got {params[:4]}")
    STRATEGIES[name] = fn


def strategy_options(strategy: str) -> list[str]:
    """The option names ``strategy`` accepts beyond the common ones."""
    return [p for p in inspect.signature(get_strategy(strategy)).parameters if p not in _COMMON]


def get_strategy(strategy: str) -> StrategyFn:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known strategies: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[strategy]


def search(
    generator: Generator,
    prompt: str,
    strategy: str = "best_of_n",
    budget: int = 1024,
    budget_unit: BudgetUnit = "tokens",
    scorer: Scorer | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    adapter: str | None = None,
    **options: Any,
) -> SearchResult:
    """Answer ``prompt`` with ``strategy`` within ``budget`` (per prompt).

    ``max_new_tokens`` is per response for single-pass strategies and per step for step-level ones
    (beam search, DVTS, Tree-of-Thoughts, MCTS). ``seed`` makes the run reproducible (call k of the
    generator gets ``seed + k``). ``adapter`` names the adapter the generator should use.
    ``options`` go to the strategy (see :func:`strategy_options`).
    """
    fn = get_strategy(strategy)
    check_prompt(prompt)
    accepted = strategy_options(strategy)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"strategy {strategy!r} has no option(s) {unknown}; it accepts {accepted}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    compute = ComputeBudget(budget, budget_unit)
    gen = BudgetedGenerator(_with_adapter(generator, adapter), compute, seed=seed)
    return fn(gen, prompt, scorer, params, **options)


def search_many(
    generator: Generator,
    prompts: Sequence[str],
    strategy: str = "best_of_n",
    progress: bool = True,
    **kwargs: Any,
) -> list[SearchResult]:
    """:func:`search` for each prompt (each with its own budget), with a tqdm progress bar.

    With ``seed``, prompt i runs with ``seed + 1_000_003 * i`` so prompts draw independent samples.
    """
    get_strategy(strategy)
    seed = kwargs.pop("seed", None)
    results = []
    for i, prompt in enumerate(tqdm(prompts, desc=strategy, disable=not progress)):
        prompt_seed = None if seed is None else seed + 1_000_003 * i
        results.append(search(generator, prompt, strategy, seed=prompt_seed, **kwargs))
    return results


class _AdapterGenerator:
    """Pins every generate call to one named adapter."""

    def __init__(self, generator: Generator, adapter: str) -> None:
        self.generator, self.adapter = generator, adapter

    def generate(self, prompts: Sequence[str], params: SamplingParams, n: int = 1, adapters: Any = None):
        return self.generator.generate(prompts, params, n=n, adapters=self.adapter)


def _with_adapter(generator: Generator, adapter: str | None) -> Generator:
    return generator if adapter is None else _AdapterGenerator(generator, adapter)
