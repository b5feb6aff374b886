"""Compute-optimal test-time allocation learned on a validation split (Snell et al., arXiv:2408.03314).

1. **Difficulty** of a question, a number in [0, 1]: from a learned predictor (for example
   ``1 - PRM value of the bare question``, which costs no generation) or from ``probe_samples``
   sampled answers scored by the verifier (their tokens are charged to the budget).
2. **Bins**: ``bins`` equal-count bins of the validation questions' difficulty (:func:`quantile_edges`).
3. **Table**: every candidate configuration (a strategy, its options and its own token budget) run
   on every validation question: right or wrong, tokens spent.
4. **Choice** (:func:`choose_per_bin`): one configuration per bin, maximising validation accuracy
   subject to a mean-tokens-per-question limit. It is a multiple-choice knapsack; dynamic
   programming over the bins with Pareto pruning solves it exactly. Without a limit each bin takes
   its most accurate configuration (ties: fewer tokens).

:func:`fit_allocation` does 2-4 and returns an :class:`AllocationPolicy`; the ``compute_optimal``
strategy (:func:`compute_optimal`) applies one to a new question: estimate its difficulty, look up
its bin, run that bin's configuration within min(its budget, what is left). With the same seed a
configuration gives the same answer inside ``compute_optimal`` as run alone, so validation choices
transfer exactly.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastpeft.reasoning.best_of_n import sample_responses
from fastpeft.reasoning.budget import BudgetedGenerator, ComputeBudget
from fastpeft.reasoning.strategy_base import SearchResult, check_prompt
from fastpeft.reasoning.types import SamplingParams, Scorer

# keys of a configuration that are not strategy options
_RESERVED = ("strategy", "budget", "max_new_tokens", "temperature", "scorer")


@dataclasses.dataclass
class AllocationPolicy:
    """Bins of difficulty (inner ``edges``, increasing) and the configuration label chosen per bin.

    ``configs[label]`` = ``{"strategy": name, "budget": tokens, "max_new_tokens"?, "temperature"?,
    "scorer"?, **strategy options}`` (``scorer`` names one of the scorers given to
    :func:`compute_optimal`); ``expected_*`` are the chosen allocation's validation accuracy and
    mean tokens.
    """

    edges: list[float]
    choices: list[str]
    configs: dict[str, dict[str, Any]]
    expected_accuracy: float = 0.0
    expected_tokens: float = 0.0

    def __post_init__(self) -> None:
        if len(self.choices) != len(self.edges) + 1:
            raise ValueError(
                f"{len(self.edges)} edges make {len(self.edges) + 1} bins, got {len(self.choices)} choices"
            )
        if list(self.edges) != sorted(self.edges):
            raise ValueError(f"bin edges must increase, got {self.edges}")
        unknown = sorted(set(self.choices) - set(self.configs))
        if unknown:
            raise ValueError(f"choices {unknown} have no configuration (known: {sorted(self.configs)})")
        for label, cfg in self.configs.items():
            if "strategy" not in cfg or not isinstance(cfg.get("budget"), int) or cfg["budget"] <= 0:
                raise ValueError(f"configuration {label!r} needs a 'strategy' and a positive int 'budget', got {cfg}")

    def bin_of(self, difficulty: float) -> int:
        return bisect.bisect_right(self.edges, difficulty)

    def config_for(self, difficulty: float) -> tuple[str, dict[str, Any]]:
        label = self.choices[self.bin_of(difficulty)]
        return label, self.configs[label]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> AllocationPolicy:
        return cls(**json.loads(text))


def quantile_edges(values: Sequence[float], bins: int) -> list[float]:
    """``bins - 1`` inner edges splitting ``values`` into equal-count bins (bin i: edges[i-1] <= v < edges[i])."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if len(values) < bins:
        raise ValueError(f"{len(values)} values cannot fill {bins} bins")
    ordered = sorted(values)
    return [ordered[(len(ordered) * i) // bins] for i in range(1, bins)]


def choose_per_bin(
    accuracy: Sequence[Mapping[str, float]],
    tokens: Sequence[Mapping[str, float]],
    weights: Sequence[float],
    max_mean_tokens: float | None = None,
) -> tuple[list[str], float, float]:
    """One label per bin maximising ``Σ_b w_b·acc_b(c_b)`` with ``Σ_b w_b·tok_b(c_b) <= max_mean_tokens``.

    ``accuracy[b][label]`` / ``tokens[b][label]``: a configuration's accuracy and mean tokens on bin
    b's questions; ``weights``: each bin's share of the questions (summing to 1). Returns
    ``(labels, accuracy, mean tokens)``; ties go to fewer tokens, then to the earlier label.
    Raises ValueError when no choice fits the limit.
    """
    if not (len(accuracy) == len(tokens) == len(weights)) or not accuracy:
        raise ValueError(
            f"need one accuracy/tokens/weight entry per bin, got {len(accuracy)}/{len(tokens)}/{len(weights)}"
        )
    frontier: list[tuple[float, float, list[str]]] = [(0.0, 0.0, [])]  # (tokens, accuracy, labels)
    for acc_b, tok_b, w in zip(accuracy, tokens, weights):
        if set(acc_b) != set(tok_b) or not acc_b:
            raise ValueError(f"a bin's accuracy and tokens must name the same non-empty labels, got {sorted(acc_b)}")
        grown = [(t + w * tok_b[c], a + w * acc_b[c], [*labels, c]) for t, a, labels in frontier for c in acc_b]
        if max_mean_tokens is not None:
            grown = [g for g in grown if g[0] <= max_mean_tokens + 1e-9]
        grown.sort(key=lambda g: (g[0], -g[1]))
        frontier = []
        for g in grown:  # keep only states that buy accuracy with their extra tokens
            if not frontier or g[1] > frontier[-1][1] + 1e-12:
                frontier.append(g)
        if not frontier:
            raise ValueError(f"no configuration fits max_mean_tokens={max_mean_tokens}")
    best = max(frontier, key=lambda g: (round(g[1], 12), -g[0]))
    return best[2], best[1], best[0]


def fit_allocation(
    difficulty: Sequence[float],
    correct: Mapping[str, Sequence[bool]],
    tokens: Mapping[str, Sequence[float]],
    configs: Mapping[str, Mapping[str, Any]],
    bins: int = 4,
    max_mean_tokens: float | None = None,
) -> AllocationPolicy:
    """Fit an :class:`AllocationPolicy` on a validation table (module docstring, steps 2-4).

    ``correct[label][q]`` / ``tokens[label][q]``: configuration ``label`` on validation question
    ``q``, whose difficulty is ``difficulty[q]``.
    """
    n = len(difficulty)
    for label in correct:
        if len(correct[label]) != n or len(tokens.get(label, ())) != n:
            raise ValueError(f"configuration {label!r} needs {n} outcomes and token counts (one per question)")
    missing = sorted(set(correct) - set(configs))
    if missing:
        raise ValueError(f"no configuration given for {missing}")
    edges = quantile_edges(difficulty, bins)
    members = [[] for _ in range(bins)]
    for q, d in enumerate(difficulty):
        members[bisect.bisect_right(edges, d)].append(q)
    # equal difficulty values can leave a bin empty; it keeps weight 0 and any choice
    accuracy = [{c: sum(correct[c][q] for q in m) / max(len(m), 1) for c in correct} for m in members]
    mean_tokens = [{c: sum(tokens[c][q] for q in m) / max(len(m), 1) for c in correct} for m in members]
    weights = [len(m) / n for m in members]
    labels, acc, tok = choose_per_bin(accuracy, mean_tokens, weights, max_mean_tokens)
    return AllocationPolicy(edges, labels, {c: dict(configs[c]) for c in correct}, acc, tok)


def compute_optimal(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    policy: AllocationPolicy | None = None,
    difficulty: Callable[[str], float] | None = None,
    probe_samples: int = 0,
    scorers: Mapping[str, Scorer] | None = None,
) -> SearchResult:
    """Estimate difficulty, then run the policy's configuration for its bin (module docstring).

    ``difficulty``: a predictor ``prompt -> [0, 1]``; with ``probe_samples`` > 0 instead, that many
    sampled responses are scored and difficulty is 1 - their mean score (their tokens count).
    ``scorers``: named scorers a configuration may pick with its ``"scorer"`` key (else ``scorer``).
    """
    from fastpeft.reasoning.search import get_strategy

    prompt = check_prompt(prompt)
    if policy is None:
        raise ValueError("compute_optimal needs policy (an AllocationPolicy from fit_allocation)")
    if (difficulty is None) == (probe_samples <= 0):
        raise ValueError("give exactly one of difficulty (a predictor) or probe_samples > 0")
    params = params or SamplingParams()
    if difficulty is not None:
        value = float(difficulty(prompt))
    else:
        if scorer is None:
            raise ValueError("probe_samples needs a scorer to score the probes")
        probes = sample_responses(generator, prompt, params, probe_samples)
        value = 1.0 - sum(scorer.score(prompt, c.text) for c in probes) / max(len(probes), 1)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {value}")
    label, config = policy.config_for(value)
    outer = generator.budget
    inner_budget = ComputeBudget(min(config["budget"], max(outer.remaining, 1)), outer.unit)
    inner = BudgetedGenerator(generator, inner_budget)
    overrides = {k: config[k] for k in ("max_new_tokens", "temperature") if k in config}
    options = {k: v for k, v in config.items() if k not in _RESERVED}
    if "scorer" in config:
        if config["scorer"] not in (scorers or {}):
            raise ValueError(
                f"configuration {label!r} names scorer {config['scorer']!r}; given: {sorted(scorers or {})}"
            )
        scorer = scorers[config["scorer"]]
    result = get_strategy(config["strategy"])(
        inner, prompt, scorer, dataclasses.replace(params, **overrides), **options
    )
    result.details.update(
        difficulty=value,
        bin=policy.bin_of(value),
        chosen=label,
        inner_strategy=result.strategy,
        **{f"outer_{k}": v for k, v in outer.summary().items()},
    )
    result.strategy = "compute_optimal"
    result.tokens_spent, result.forward_passes, result.budget = outer.tokens_spent, outer.forward_passes, outer.limit
    return result
