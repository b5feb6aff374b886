"""What every search strategy shares: the result type, scoring with bookkeeping, final selection.

A strategy is a function ``(generator, prompt, budget, scorer, params, **options) -> SearchResult``
where ``generator`` is a :class:`~fastpeft.reasoning.budget.BudgetedGenerator`; see
:mod:`fastpeft.reasoning.search` for the registry and the one public entry point.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

from fastpeft.reasoning.answers import canonicalize, has_answer_marker, majority_vote, weighted_vote
from fastpeft.reasoning.budget import ComputeBudget
from fastpeft.reasoning.types import Completion, Scorer

Aggregate = Literal["best", "weighted", "majority"]
AGGREGATES: tuple[str, ...] = ("best", "weighted", "majority")


@dataclasses.dataclass
class Candidate:
    """One finished (or, when the budget ran out, unfinished) response a strategy considered."""

    text: str
    answer: str | None
    score: float | None
    complete: bool = True


@dataclasses.dataclass
class SearchResult:
    """What a strategy returns. ``text`` is the chosen response (prompt excluded)."""

    prompt: str
    strategy: str
    answer: str | None
    text: str
    score: float | None
    tokens_spent: int
    forward_passes: int
    budget: int
    budget_unit: str
    candidates: list[Candidate] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self, with_candidates: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not with_candidates:
            out.pop("candidates")
        return out


def ends_response(step: Completion) -> bool:
    """A step ends the response at EOS, or when it states an answer and was not cut off by length
    (a cut-off "answer 8" may be the start of "answer 85")."""
    return step.finish_reason == "eos" or (step.finish_reason != "length" and has_answer_marker(step.text))


def check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty")
    return prompt


def check_aggregate(aggregate: str) -> None:
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; known: {', '.join(AGGREGATES)}")


def require_scorer(scorer: Scorer | None, strategy: str) -> Scorer:
    if scorer is None:
        raise ValueError(f"strategy {strategy!r} ranks responses and needs a scorer (a verifier or reward model)")
    if not hasattr(scorer, "score"):
        raise TypeError(f"scorer must have a score(prompt, response) method, got {type(scorer).__name__}")
    return scorer


class ScoreKeeper:
    """Calls a scorer, checks its output is in [0, 1], caches by text, and collects problems.

    Scorers with an ``evaluate(prompt, response)`` method (a :class:`VerifierStack`) report which
    verifiers raised or timed out; those reports land in ``problems`` and then in the result's
    ``details["verifier_problems"]`` instead of vanishing into a number.
    """

    def __init__(self, scorer: Scorer, budget: ComputeBudget) -> None:
        self.scorer = scorer
        self.budget = budget
        self.problems: list[dict[str, Any]] = []
        self._cache: dict[str, float] = {}

    def __call__(self, prompt: str, response: str) -> float:
        if response in self._cache:
            return self._cache[response]
        self.budget.scorer_calls += 1
        evaluate = getattr(self.scorer, "evaluate", None)
        if callable(evaluate):
            report = evaluate(prompt, response)
            value = report.score
            if report.problems:
                self.problems.append({"response": response[-200:], "problems": report.problems})
        else:
            value = self.scorer.score(prompt, response)
        value = float(value)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"scorer {type(self.scorer).__name__} returned {value}, outside [0, 1]")
        self._cache[response] = value
        return value

    def many(self, prompt: str, responses: Sequence[str]) -> list[float]:
        """Scores of several responses; a scorer with ``score_batch(prompt, responses)`` (a learned
        reward model) gets the uncached ones in one call, anything else is called per response."""
        batch = getattr(self.scorer, "score_batch", None)
        todo = list(dict.fromkeys(r for r in responses if r not in self._cache))
        if callable(batch) and not callable(getattr(self.scorer, "evaluate", None)) and len(todo) > 1:
            values = [float(v) for v in batch(prompt, todo)]
            if len(values) != len(todo):
                raise ValueError(
                    f"{type(self.scorer).__name__}.score_batch returned {len(values)} scores for {len(todo)} responses"
                )
            self.budget.scorer_calls += len(todo)
            for response, value in zip(todo, values):
                if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                    raise ValueError(f"scorer {type(self.scorer).__name__} returned {value}, outside [0, 1]")
                self._cache[response] = value
        return [self(prompt, r) for r in responses]


def select(candidates: Sequence[Candidate], aggregate: Aggregate = "best") -> tuple[Candidate | None, dict[str, Any]]:
    """Pick the final candidate and describe the vote.

    - ``best``: the highest score (None scores rank last); ties go to the earliest candidate.
    - ``weighted``: answers vote with the sum of their candidates' scores (weighted best-of-N).
    - ``majority``: answers vote with their counts.
    For votes, the returned candidate is the best-scoring one among those with the winning answer.
    """
    check_aggregate(aggregate)
    if not candidates:
        return None, {}

    def rank(i: int) -> tuple[float, int]:
        s = candidates[i].score
        return (-(s if s is not None else -1.0), i)

    if aggregate == "best":
        return candidates[min(range(len(candidates)), key=rank)], {}
    answers = [c.answer for c in candidates]
    if aggregate == "weighted":
        winner, weight = weighted_vote(answers, [c.score or 0.0 for c in candidates])
        info: dict[str, Any] = {"vote_answer": winner, "vote_weight": weight}
    else:
        winner, share = majority_vote(answers)
        info = {"vote_answer": winner, "vote_share": share}
    if winner is None:  # nobody stated an answer: fall back to ranking, and say so
        info["vote"] = "no candidate stated an answer; chose by score"
        return candidates[min(range(len(candidates)), key=rank)], info
    pool = [i for i, c in enumerate(candidates) if canonicalize(c.answer) == winner]
    return candidates[min(pool, key=rank)], info


def make_result(
    strategy: str,
    prompt: str,
    chosen: Candidate | None,
    candidates: list[Candidate],
    budget: ComputeBudget,
    keeper: ScoreKeeper | None = None,
    details: dict[str, Any] | None = None,
) -> SearchResult:
    details = dict(details or {})
    details.update(budget.summary())
    if keeper is not None:
        details["verifier_problems"] = keeper.problems
    if chosen is None:
        details.setdefault("note", "budget spent before any response was produced")
    return SearchResult(
        prompt=prompt,
        strategy=strategy,
        answer=chosen.answer if chosen else None,
        text=chosen.text if chosen else "",
        score=chosen.score if chosen else None,
        tokens_spent=budget.tokens_spent,
        forward_passes=budget.forward_passes,
        budget=budget.limit,
        budget_unit=budget.unit,
        candidates=candidates,
        details=details,
    )
