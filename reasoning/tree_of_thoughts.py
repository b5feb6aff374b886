"""Tree-of-Thoughts, breadth-first with backtracking.

Each level extends every frontier state with ``n_thoughts`` candidate thoughts (one step each,
ending at the step delimiter), scores each new state with the value function (any scorer), and
keeps the top ``keep`` states whose value reaches ``threshold``. States that reach the threshold but
miss the cut are remembered per level; when every child of a level scores below the threshold, the
search backtracks to the most recent level with remembered states and continues from the best of
them. A state's accumulated reward is the sum of the values along its path (reported with each
finished candidate); the final answer is the finished state of highest value (ties: found first).
"""

from __future__ import annotations

import dataclasses

from fastpeft.reasoning.answers import extract_answer
from fastpeft.reasoning.beam import step_params
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
class Thought:
    """A state: the response so far, its value, the accumulated value of its path, its depth."""

    text: str
    value: float
    accumulated: float
    depth: int
    ended: bool = False  # ended at EOS or stated an answer
    finished: bool = False  # ended, or reached max_depth


def tree_of_thoughts(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    n_thoughts: int = 3,
    keep: int = 2,
    max_depth: int = 8,
    threshold: float = 0.5,
    stop: str | tuple[str, ...] = "\n",
    aggregate: Aggregate = "best",
) -> SearchResult:
    """BFS over thoughts; see the module docstring. ``max_depth`` bounds the steps per path."""
    prompt = check_prompt(prompt)
    keeper = ScoreKeeper(require_scorer(scorer, "tree_of_thoughts"), generator.budget)
    check_aggregate(aggregate)
    if n_thoughts < 1 or keep < 1 or max_depth < 1:
        raise ValueError(f"n_thoughts, keep, max_depth must be >= 1, got {n_thoughts}, {keep}, {max_depth}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    params = step_params(params, stop)
    budget = generator.budget

    frontier = [Thought("", 0.0, 0.0, 0)]
    reserves: list[list[Thought]] = []  # per expanded level: good states that missed the cut
    finished: list[Thought] = []
    below: list[Thought] = []  # finished states under the threshold, used only if nothing else finishes
    levels = backtracks = 0
    best_open: Thought | None = None  # best unfinished state seen, reported if nothing finishes
    while frontier and not budget.exhausted:
        affordable = budget.rows_affordable(params.max_new_tokens) // n_thoughts
        if affordable == 0 and (finished or levels):
            break
        frontier = frontier[: max(1, affordable)]
        if not budget.can_generate(len(frontier) * n_thoughts):
            break
        outs = generator.generate([prompt + t.text for t in frontier], params, n=n_thoughts)
        levels += 1
        children: list[Thought] = []
        for parent, row in zip(frontier, outs, strict=True):
            for c in row:
                text = parent.text + c.text
                value = keeper(prompt, text)
                ended = ends_response(c)
                depth = parent.depth + 1
                done = ended or depth >= max_depth
                children.append(Thought(text, value, parent.accumulated + value, depth, ended, done))
        for t in children:
            if t.finished:
                (finished if t.value >= threshold else below).append(t)
            elif best_open is None or t.value > best_open.value:
                best_open = t
        good = sorted((t for t in children if not t.finished and t.value >= threshold), key=lambda t: -t.value)
        if good:
            frontier = good[:keep]
            reserves.append(good[keep:])
            continue
        if any(t.finished and t.value >= threshold for t in children):
            break  # this level ended in good answers and left nothing worth extending
        # every child fell below the threshold: backtrack to the most recent level that still
        # holds good, unexplored states
        frontier = []
        while reserves and not frontier:
            spare = reserves.pop()
            if spare:
                frontier = spare[:keep]
                reserves.append(spare[keep:])
                backtracks += 1
    pool = finished or below
    cands = [Candidate(t.text, extract_answer(t.text), t.value, t.ended) for t in pool]
    if not cands and best_open is not None:  # nothing finished: report the best open state as such
        cands = [Candidate(best_open.text, extract_answer(best_open.text), best_open.value, False)]
    chosen, vote = select(cands, aggregate)
    details = {
        "levels": levels,
        "backtracks": backtracks,
        "finished": len(finished),
        "finished_below_threshold": len(below),
        "accumulated_rewards": [t.accumulated for t in pool],
        **vote,
    }
    return make_result("tree_of_thoughts", prompt, chosen, cands, generator.budget, keeper, details)
