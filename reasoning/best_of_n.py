"""Single-pass strategies: greedy, sampling, best-of-N, weighted best-of-N, majority vote.

Every function takes a :class:`BudgetedGenerator` (the budget rides on it), a prompt, an optional
scorer and base :class:`SamplingParams` (``max_new_tokens`` is per response), and returns a
:class:`SearchResult`. N is an upper bound: sampling stops early when the budget cannot pay for
another full response, so at equal compute a larger N simply means "as many as the budget allows".
"""

from __future__ import annotations

import dataclasses

from fastpeft.reasoning.answers import extract_answer
from fastpeft.reasoning.budget import BudgetedGenerator
from fastpeft.reasoning.strategy_base import (
    Aggregate,
    Candidate,
    ScoreKeeper,
    SearchResult,
    check_aggregate,
    check_prompt,
    make_result,
    require_scorer,
    select,
)
from fastpeft.reasoning.types import Completion, SamplingParams, Scorer


def sample_responses(generator: BudgetedGenerator, prompt: str, params: SamplingParams, n: int) -> list[Completion]:
    """Up to ``n`` full responses, in batches the budget can pay for in full.

    Only when not even one full-length response is affordable and none was produced yet does it
    spend the remainder on one shorter (possibly truncated) response.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    budget = generator.budget
    out: list[Completion] = []
    while len(out) < n and not budget.exhausted:
        rows = min(n - len(out), budget.rows_affordable(params.max_new_tokens))
        if rows == 0:
            if out:
                break
            rows = 1  # BudgetedGenerator shortens max_new_tokens to what is left
        out.extend(generator.generate([prompt], params, n=rows)[0])
    return out


def _score_all(completions: list[Completion], prompt: str, keeper: ScoreKeeper | None) -> list[Candidate]:
    scores = keeper.many(prompt, [c.text for c in completions]) if keeper else [None] * len(completions)
    return [
        Candidate(text=c.text, answer=extract_answer(c.text), score=s, complete=c.finish_reason != "length")
        for c, s in zip(completions, scores)
    ]


def greedy(
    generator: BudgetedGenerator, prompt: str, scorer: Scorer | None = None, params: SamplingParams | None = None
) -> SearchResult:
    """One temperature-0 response (scored for the report when a scorer is given)."""
    prompt = check_prompt(prompt)
    params = dataclasses.replace(params or SamplingParams(), temperature=0.0)
    keeper = ScoreKeeper(scorer, generator.budget) if scorer is not None else None
    cands = _score_all(sample_responses(generator, prompt, params, 1), prompt, keeper)
    return make_result("greedy", prompt, cands[0] if cands else None, cands, generator.budget, keeper)


def sampling(
    generator: BudgetedGenerator, prompt: str, scorer: Scorer | None = None, params: SamplingParams | None = None
) -> SearchResult:
    """One sampled response at ``params.temperature``."""
    prompt = check_prompt(prompt)
    params = params or SamplingParams()
    keeper = ScoreKeeper(scorer, generator.budget) if scorer is not None else None
    cands = _score_all(sample_responses(generator, prompt, params, 1), prompt, keeper)
    return make_result("sampling", prompt, cands[0] if cands else None, cands, generator.budget, keeper)


def best_of_n(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    n: int = 8,
    aggregate: Aggregate = "best",
) -> SearchResult:
    """Sample up to ``n`` responses, score each, keep the best (``aggregate="best"``) or vote.

    Ties in score go to the earliest sample; votes go to the answer seen first.
    """
    prompt = check_prompt(prompt)
    names = {"best": "best_of_n", "weighted": "weighted_best_of_n", "majority": "majority_vote"}
    name = names.get(aggregate, aggregate)
    keeper = ScoreKeeper(require_scorer(scorer, name), generator.budget)
    check_aggregate(aggregate)
    cands = _score_all(sample_responses(generator, prompt, params or SamplingParams(), n), prompt, keeper)
    chosen, info = select(cands, aggregate)
    return make_result(name, prompt, chosen, cands, generator.budget, keeper, {"samples": len(cands), **info})


def weighted_best_of_n(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    n: int = 8,
) -> SearchResult:
    """Best-of-N where each canonical answer scores the sum of its responses' scores."""
    return best_of_n(generator, prompt, scorer, params, n=n, aggregate="weighted")


def majority_vote(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    n: int = 8,
) -> SearchResult:
    """Self-consistency: the most frequent canonical answer among up to ``n`` samples.

    Needs no scorer; with one, responses are scored for the report and break ties between
    responses that share the winning answer.
    """
    prompt = check_prompt(prompt)
    keeper = ScoreKeeper(scorer, generator.budget) if scorer is not None else None
    cands = _score_all(sample_responses(generator, prompt, params or SamplingParams(), n), prompt, keeper)
    chosen, info = select(cands, "majority")
    details = {"samples": len(cands), **info}
    return make_result("majority_vote", prompt, chosen, cands, generator.budget, keeper, details)
