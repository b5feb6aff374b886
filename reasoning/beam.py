"""Step-level beam search with a verifier, and DVTS (diverse verifier tree search).

A *step* is one generate call that ends at the step delimiter (``stop``, e.g. ``"\\n\\n"``). The
scorer (a process reward model or a rule verifier) scores each partial response; a response is
finished when its last step ended at EOS or stated an answer (``answer: ...``).

- Beam search, N responses and beam width M: the first step samples N candidates; each round keeps
  the top N/M unfinished prefixes by score and extends each with M sampled steps (N rows again).
- DVTS: N/M independent subtrees, each a beam search that keeps its single best prefix and extends
  it with M steps. Subtrees share generate calls (one batched call per round) but never compete,
  which keeps the final pool diverse when the verifier is over-confident on one line of thought.
Both stop when every prefix finished, after ``max_steps`` rounds, or when the budget cannot pay for
another round; unfinished prefixes are then reported as incomplete candidates.
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
    ends_response,
    make_result,
    require_scorer,
    select,
)
from fastpeft.reasoning.types import SamplingParams, Scorer


@dataclasses.dataclass
class _Beam:
    text: str  # response so far, prompt excluded
    score: float
    group: int
    finished: bool


def step_params(params: SamplingParams | None, stop: str | tuple[str, ...]) -> SamplingParams:
    """``params`` with the step delimiter(s) as stop strings (``max_new_tokens`` is per step)."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not stops or any(not s for s in stops):
        raise ValueError(f"step delimiter must be one or more non-empty strings, got {stop!r}")
    return dataclasses.replace(params or SamplingParams(), stop=stops)


def _grouped_beam(
    generator: BudgetedGenerator,
    prompt: str,
    keeper: ScoreKeeper,
    params: SamplingParams,
    n: int,
    groups: int,
    keep: int,
    width: int,
    max_steps: int,
) -> tuple[list[Candidate], dict[str, int]]:
    budget = generator.budget
    finished: list[Candidate] = []
    active: list[_Beam] = [_Beam("", 0.0, g, False) for g in range(groups)]
    first_rows = n // groups  # the first step samples N candidates in all, M per subtree for DVTS
    steps = 0
    while active and steps < max_steps and not budget.exhausted:
        rows_each = first_rows if steps == 0 else width
        affordable = budget.rows_affordable(params.max_new_tokens) // rows_each
        if affordable < len(active):
            if affordable == 0 and (finished or steps > 0):
                break
            # keep the best prefixes that the budget can still extend (at least one; the
            # generator shortens that last step if even one full step is unaffordable)
            active = sorted(active, key=lambda b: -b.score)[: max(1, affordable)]
        if not budget.can_generate(len(active) * rows_each):
            break
        outs = generator.generate([prompt + b.text for b in active], params, n=rows_each)
        steps += 1
        grown = [
            (beam, beam.text + c.text, ends_response(c)) for beam, row in zip(active, outs, strict=True) for c in row
        ]
        scores = keeper.many(prompt, [text for _, text, _ in grown])
        children = [_Beam(text, s, beam.group, done) for (beam, text, done), s in zip(grown, scores)]
        active = []
        for g in range(groups):
            mine = [b for b in children if b.group == g]
            for b in mine:
                if b.finished:
                    finished.append(Candidate(b.text, extract_answer(b.text), b.score, True))
            if groups > 1 and any(b.finished for b in mine):
                continue  # a DVTS subtree ends with its first finished response
            # stable sort: equal scores keep generation order, so ties resolve deterministically
            alive = sorted((b for b in mine if not b.finished), key=lambda b: -b.score)
            active.extend(alive[:keep])
        if groups == 1 and len(finished) >= n:
            break
    leftovers = [Candidate(b.text, extract_answer(b.text), b.score, False) for b in active if b.text]
    return finished + leftovers, {"steps": steps, "finished": len(finished), "unfinished": len(leftovers)}


def _run(
    name: str,
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None,
    params: SamplingParams | None,
    n: int,
    beam_width: int,
    max_steps: int,
    stop: str | tuple[str, ...],
    aggregate: Aggregate,
    dvts: bool,
) -> SearchResult:
    prompt = check_prompt(prompt)
    keeper = ScoreKeeper(require_scorer(scorer, name), generator.budget)
    check_aggregate(aggregate)
    if beam_width < 1 or n < beam_width or n % beam_width:
        raise ValueError(f"{name} needs n a positive multiple of beam_width, got n={n}, beam_width={beam_width}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    groups, keep = (n // beam_width, 1) if dvts else (1, n // beam_width)
    cands, info = _grouped_beam(
        generator, prompt, keeper, step_params(params, stop), n, groups, keep, beam_width, max_steps
    )
    complete = [c for c in cands if c.complete]
    chosen, vote = select(complete or cands, aggregate)
    return make_result(name, prompt, chosen, cands, generator.budget, keeper, {**info, "groups": groups, **vote})


def beam_search(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    n: int = 8,
    beam_width: int = 4,
    max_steps: int = 16,
    stop: str | tuple[str, ...] = "\n",
    aggregate: Aggregate = "best",
) -> SearchResult:
    """Beam search over steps: keep the top ``n // beam_width`` prefixes, extend each ``beam_width`` ways."""
    return _run("beam_search", generator, prompt, scorer, params, n, beam_width, max_steps, stop, aggregate, False)


def dvts(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    n: int = 8,
    beam_width: int = 4,
    max_steps: int = 16,
    stop: str | tuple[str, ...] = "\n",
    aggregate: Aggregate = "best",
) -> SearchResult:
    """Diverse verifier tree search: ``n // beam_width`` independent greedy-by-verifier subtrees."""
    return _run("dvts", generator, prompt, scorer, params, n, beam_width, max_steps, stop, aggregate, True)
