"""Compute allocation: route queries by estimated difficulty, escalate when the model is unsure.

Dynamic allocation, with the thresholds of the survey "LLM Post-Training: A Deep Dive into Reasoning
Large Language Models" (arXiv:2502.21321, test-time scaling; after the compute-optimal allocation of
Snell et al., arXiv:2408.03314): a difficulty in [0, 1] from query features routes to greedy decoding
(< ``low`` = 0.3), beam search of width 3 (``low``..``high``) or MCTS of depth 5 (>= ``high`` = 0.7).
The features, each in [0, 1]:

- ``length``: words / ``length_scale`` (saturating at 1);
- ``structure``: numbers, operators, nesting depth and multi-step words / ``structure_scale``;
- ``domain``: domain terms present / 3;
- ``ambiguity``: vague words (``maybe``, ``some``, ``it`` ...) and extra question marks / 4;
- ``history``: 1 - similarity-weighted accuracy on similar past queries (:class:`OutcomeHistory`);
  absent when no past query is similar enough, and then left out of the weighted mean.

Meta-cognition: a cheap probe (greedy, or a few samples) measures uncertainty, either the mean
token entropy estimated from the sampled tokens' logprobs, or the disagreement among the probe's
answers; above ``threshold`` the query escalates to a stronger strategy with the budget that is
left, otherwise the probe's answer is returned at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

from fastpeft.reasoning.answers import canonicalize, extract_answer
from fastpeft.reasoning.beam import beam_search, dvts
from fastpeft.reasoning.best_of_n import best_of_n, greedy, majority_vote, sample_responses, weighted_best_of_n
from fastpeft.reasoning.budget import BudgetedGenerator
from fastpeft.reasoning.mcts import mcts
from fastpeft.reasoning.strategy_base import Candidate, ScoreKeeper, SearchResult, check_prompt, make_result, select
from fastpeft.reasoning.tree_of_thoughts import tree_of_thoughts
from fastpeft.reasoning.types import Completion, SamplingParams, Scorer

DEFAULT_WEIGHTS: Mapping[str, float] = {
    "length": 0.2,
    "structure": 0.25,
    "domain": 0.15,
    "ambiguity": 0.1,
    "history": 0.3,
}
_VAGUE = frozenset(
    [
        "some",
        "maybe",
        "might",
        "perhaps",
        "approximately",
        "roughly",
        "about",
        "several",
        "it",
        "they",
        "this",
        "that",
        "which",
        "or",
        "best",
        "good",
        "better",
        "thing",
        "stuff",
        "somehow",
    ]
)
_STEP_WORDS = frozenset(
    ["then", "after", "before", "each", "every", "total", "remaining", "if", "twice", "half", "times", "per"]
)
_OPERATORS = re.compile(r"[+\-*/^=<>×÷%]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+(?:\.\d+)?", text.lower())


def _shape(text: str) -> Counter[str]:
    # numbers become their digit count ("#2"), so "12 + 7" and "40 + 2" look alike to the history
    # lookup while "98 + 76 + 54 + 32" does not; a multiset, so repetition counts
    return Counter(f"#{len(w.split('.')[0])}" if w[0].isdigit() else w for w in _words(text)) + Counter(
        _OPERATORS.findall(text)
    )


class OutcomeHistory:
    """Past ``(query, correct)`` outcomes; similarity is the weighted Jaccard overlap of word shapes."""

    def __init__(self, records: Iterable[tuple[str, bool]] = (), min_similarity: float = 0.5, k: int = 5) -> None:
        if not 0.0 <= min_similarity <= 1.0 or k < 1:
            raise ValueError(f"need min_similarity in [0, 1] and k >= 1, got {min_similarity}, {k}")
        self.min_similarity, self.k = min_similarity, k
        self.records: list[tuple[Counter[str], bool]] = []
        for query, correct in records:
            self.add(query, correct)

    def add(self, query: str, correct: bool) -> None:
        self.records.append((_shape(query), bool(correct)))

    def similar(self, query: str) -> list[tuple[float, bool]]:
        """Up to ``k`` (similarity, correct) pairs at or above ``min_similarity``, most similar first.

        Among equally similar records the most recent come first, so the history keeps learning
        when many queries look alike (else the oldest few would decide every later route).
        """
        shape = _shape(query)
        sims = []
        for past, correct in reversed(self.records):
            union = sum((shape | past).values())
            sim = sum((shape & past).values()) / union if union else 0.0
            if sim >= self.min_similarity:
                sims.append((sim, correct))
        return sorted(sims, key=lambda p: -p[0])[: self.k]

    def accuracy_near(self, query: str) -> float | None:
        """Similarity-weighted accuracy over similar past queries; None when there are none."""
        near = self.similar(query)
        total = sum(s for s, _ in near)
        return sum(s for s, ok in near if ok) / total if total else None


@dataclasses.dataclass
class DifficultyEstimator:
    """Difficulty in [0, 1] as a weighted mean of the features in the module docstring."""

    domain_terms: Collection[str] = ()
    history: OutcomeHistory | None = None
    weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    length_scale: int = 64
    structure_scale: int = 12

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown difficulty features {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError(f"feature weights must be >= 0 and not all 0, got {dict(self.weights)}")
        if self.length_scale < 1 or self.structure_scale < 1:
            raise ValueError("length_scale and structure_scale must be >= 1")

    def features(self, query: str) -> dict[str, float | None]:
        words = _words(query)
        lowered = query.lower()
        depth = level = 0
        for ch in query:
            level += ch == "("
            level -= ch == ")"
            depth = max(depth, level)
        structure = (
            len(_NUMBER.findall(query))
            + len(_OPERATORS.findall(query))
            + 2 * depth
            + sum(w in _STEP_WORDS for w in words)
        )
        domain_hits = sum(1 for t in self.domain_terms if re.search(rf"\b{re.escape(t.lower())}\b", lowered))
        vague = sum(w in _VAGUE for w in words) + max(0, query.count("?") - 1)
        accuracy = self.history.accuracy_near(query) if self.history is not None else None
        return {
            "length": min(1.0, len(words) / self.length_scale),
            "structure": min(1.0, structure / self.structure_scale),
            "domain": min(1.0, domain_hits / 3),
            "ambiguity": min(1.0, vague / 4),
            "history": None if accuracy is None else 1.0 - accuracy,
        }

    def estimate(self, query: str) -> float:
        feats = self.features(query)
        used = {k: v for k, v in feats.items() if v is not None and self.weights.get(k, 0) > 0}
        total = sum(self.weights[k] for k in used)
        return min(1.0, max(0.0, sum(self.weights[k] * v for k, v in used.items()) / total)) if total else 0.0


def route(difficulty: float, low: float = 0.3, high: float = 0.7) -> Literal["greedy", "beam_search", "mcts"]:
    """greedy below ``low``, beam search in [low, high), MCTS at or above ``high``."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    return "greedy" if difficulty < low else "beam_search" if difficulty < high else "mcts"


def dynamic_allocation(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    estimator: DifficultyEstimator | None = None,
    low: float = 0.3,
    high: float = 0.7,
    beam_width: int = 3,
    beam_n: int = 9,
    mcts_depth: int = 5,
    mcts_expand: int = 3,
    stop: str | tuple[str, ...] = "\n",
    greedy_params: SamplingParams | None = None,
) -> SearchResult:
    """Estimate difficulty, then run greedy / beam search (width 3) / MCTS (depth 5) with the budget.

    ``params`` are per step for beam search and MCTS (``max_new_tokens`` bounds one step, ended
    by ``stop``); the greedy route writes the whole response in one call, so it takes
    ``greedy_params`` (default: ``params`` with ``max_new_tokens`` times ``mcts_depth``, room for
    as many steps as the MCTS route may take).
    """
    prompt = check_prompt(prompt)
    estimator = estimator or DifficultyEstimator()
    difficulty = estimator.estimate(prompt)
    routed = route(difficulty, low, high)
    if routed == "greedy":
        if greedy_params is None and params is not None:
            greedy_params = dataclasses.replace(params, max_new_tokens=params.max_new_tokens * max(mcts_depth, 1))
        result = greedy(generator, prompt, scorer, greedy_params)
    elif routed == "beam_search":
        result = beam_search(generator, prompt, scorer, params, n=beam_n, beam_width=beam_width, stop=stop)
    else:
        result = mcts(generator, prompt, scorer, params, max_depth=mcts_depth, expand=mcts_expand, stop=stop)
    result.details.update(difficulty=difficulty, features=estimator.features(prompt), routed_to=routed)
    result.strategy = "dynamic_allocation"
    return result


def mean_token_entropy(completions: Sequence[Completion]) -> float:
    """Mean over all generated tokens of -log p(token): with sampled tokens this is an unbiased
    estimate of the mean per-token entropy (greedy tokens underestimate it). 0.0 for no tokens."""
    logprobs = [lp for c in completions for lp in c.token_logprobs]
    return -sum(logprobs) / len(logprobs) if logprobs else 0.0


def answer_disagreement(answers: Sequence[str | None]) -> float:
    """1 - (share of the most common canonical answer); a missing answer agrees with nobody."""
    if not answers:
        raise ValueError("need at least one answer")
    counts: dict[str, int] = {}
    for a in answers:
        key = canonicalize(a)
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    return 1.0 - (max(counts.values()) / len(answers) if counts else 0.0)


ESCALATIONS = {
    "best_of_n": best_of_n,
    "weighted_best_of_n": weighted_best_of_n,
    "majority_vote": majority_vote,
    "beam_search": beam_search,
    "dvts": dvts,
    "tree_of_thoughts": tree_of_thoughts,
    "mcts": mcts,
}


def metacognitive(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    probe_samples: int = 3,
    measure: Literal["entropy", "disagreement"] = "entropy",
    threshold: float = 0.5,
    escalate_to: str = "beam_search",
    escalate_options: Mapping[str, Any] | None = None,
    stop: str | tuple[str, ...] | None = None,
) -> SearchResult:
    """Probe cheaply; answer at once if uncertainty <= ``threshold``, else escalate.

    ``probe_samples == 1`` probes with one greedy response, more with sampled ones (answer: their
    majority). ``threshold`` is in nats for ``entropy`` and a share in [0, 1] for ``disagreement``.
    ``stop`` is the step delimiter handed to a step-level escalation (unless its options set one).
    """
    prompt = check_prompt(prompt)
    if measure not in ("entropy", "disagreement"):
        raise ValueError(f"measure must be 'entropy' or 'disagreement', got {measure!r}")
    if escalate_to not in ESCALATIONS:
        raise ValueError(f"unknown escalation strategy {escalate_to!r}; known: {', '.join(sorted(ESCALATIONS))}")
    if probe_samples < 1:
        raise ValueError(f"probe_samples must be >= 1, got {probe_samples}")
    params = params or SamplingParams()
    probe_params = dataclasses.replace(params, temperature=0.0) if probe_samples == 1 else params
    probe = sample_responses(generator, prompt, probe_params, probe_samples)
    answers = [extract_answer(c.text) for c in probe]
    if measure == "entropy":
        uncertainty = mean_token_entropy(probe)
    else:
        uncertainty = answer_disagreement(answers) if probe else 1.0
    info = {"uncertainty": uncertainty, "measure": measure, "threshold": threshold, "probe_samples": len(probe)}
    if uncertainty <= threshold or generator.budget.exhausted:
        keeper = ScoreKeeper(scorer, generator.budget) if scorer is not None else None
        cands = [
            Candidate(c.text, a, keeper(prompt, c.text) if keeper else None, c.finish_reason != "length")
            for c, a in zip(probe, answers, strict=True)
        ]
        chosen, vote = select(cands, "majority")
        escalated_note = {"escalated": False}
        if uncertainty > threshold:
            escalated_note["note"] = "uncertain, but the budget was spent by the probe"
        return make_result(
            "metacognitive", prompt, chosen, cands, generator.budget, keeper, {**info, **vote, **escalated_note}
        )
    options = dict(escalate_options or {})
    if stop is not None and "stop" in inspect.signature(ESCALATIONS[escalate_to]).parameters:
        options.setdefault("stop", stop)
    result = ESCALATIONS[escalate_to](generator, prompt, scorer, params, **options)
    result.details.update(info, escalated=True, escalated_to=escalate_to)
    result.strategy = "metacognitive"
    return result
