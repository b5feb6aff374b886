"""Multi-agent decomposition (a "swarm"): decompose -> solve the parts -> integrate.

Each role is an adapter on one base model, named per generate call, so one model in memory serves
all of them (the sampler routes rows with :func:`fastpeft.route_adapters` when a call mixes
adapters):

1. the **decomposer** writes the sub-questions of the question (one greedy call);
2. the task's ``parse_parts(question, decomposition)`` turns that text into part prompts;
3. the **solver** answers every part in one batched call (``samples_per_part`` samples each; a
   part's answer is their majority vote, or the scorer's best with ``aggregate="best"``);
4. the task's ``integration_prompt(question, parts, answers)`` builds the integrator's question
   and the **integrator** writes the final solution (one greedy call).

Every call is charged to the one budget. A decomposition that parses into no parts, or a part
with no answer, ends the search early with no answer (``details["failed"]`` says where).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from fastpeft.reasoning.answers import extract_answer, majority_vote
from fastpeft.reasoning.budget import BudgetedGenerator, BudgetExhausted
from fastpeft.reasoning.strategy_base import Candidate, ScoreKeeper, SearchResult, check_prompt, make_result, select
from fastpeft.reasoning.types import SamplingParams, Scorer

PartParser = Callable[[str, str], Sequence[str]]
IntegrationPrompt = Callable[[str, Sequence[str], Sequence[str]], str]


def swarm(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    parse_parts: PartParser | None = None,
    integration_prompt: IntegrationPrompt | None = None,
    decomposer: str | None = "decomposer",
    solver: str | None = "solver",
    integrator: str | None = "integrator",
    samples_per_part: int = 1,
    aggregate: str = "majority",
    decompose_tokens: int = 48,
    integrate_tokens: int | None = None,
) -> SearchResult:
    """Decompose, solve the parts in one batch, integrate (module docstring).

    ``params`` are the solver's (``max_new_tokens`` per part solution); the decomposer and the
    integrator decode greedily with ``decompose_tokens`` / ``integrate_tokens`` (default: the
    solver's). Role names are adapter names (None: the model's active adapter).
    """
    prompt = check_prompt(prompt)
    if parse_parts is None or integration_prompt is None:
        raise ValueError("swarm needs the task's parse_parts and integration_prompt functions")
    if samples_per_part < 1:
        raise ValueError(f"samples_per_part must be >= 1, got {samples_per_part}")
    if aggregate not in ("majority", "best"):
        raise ValueError(f"aggregate must be 'majority' or 'best', got {aggregate!r}")
    if aggregate == "best" and scorer is None:
        raise ValueError("aggregate='best' ranks part solutions and needs a scorer")
    params = params or SamplingParams()
    greedy = dataclasses.replace(params, temperature=0.0)
    keeper = ScoreKeeper(scorer, generator.budget) if scorer is not None else None
    details: dict = {"roles": {"decomposer": decomposer, "solver": solver, "integrator": integrator}}

    try:
        decomposition = generator.generate(
            [prompt], dataclasses.replace(greedy, max_new_tokens=decompose_tokens), adapters=decomposer
        )[0][0].text
    except BudgetExhausted:
        return _failed(prompt, generator, keeper, details, "budget spent before the decomposition")
    parts = list(parse_parts(prompt, decomposition))
    details.update(decomposition=decomposition, parts=parts)
    if not parts:
        return _failed(prompt, generator, keeper, details, "decomposition has no parts")

    try:
        solutions = generator.generate(parts, params, n=samples_per_part, adapters=solver)
    except BudgetExhausted:
        return _failed(prompt, generator, keeper, details, "budget spent before the parts were solved")
    answers, part_texts = [], []
    for part, samples in zip(parts, solutions, strict=True):
        if aggregate == "majority":
            winner, _ = majority_vote([extract_answer(c.text) for c in samples])
            text = next((c.text for c in samples if extract_answer(c.text) == winner), samples[0].text)
        else:
            scores = keeper.many(part, [c.text for c in samples])
            cands = [Candidate(c.text, extract_answer(c.text), s) for c, s in zip(samples, scores)]
            best, _ = select(cands, "best")
            winner, text = best.answer, best.text
        answers.append(winner)
        part_texts.append(text)
    details.update(part_answers=answers, part_solutions=part_texts)
    if any(a is None for a in answers):
        return _failed(prompt, generator, keeper, details, "a part has no answer")

    final_prompt = integration_prompt(prompt, parts, answers)
    tokens = integrate_tokens or params.max_new_tokens
    details["integration_prompt"] = final_prompt
    try:
        final = generator.generate(
            [final_prompt], dataclasses.replace(greedy, max_new_tokens=tokens), adapters=integrator
        )[0][0]
    except BudgetExhausted:
        return _failed(prompt, generator, keeper, details, "budget spent before the integration")
    score = keeper(prompt, final.text) if keeper is not None else None
    chosen = Candidate(final.text, extract_answer(final.text), score, final.finish_reason != "length")
    return make_result("swarm", prompt, chosen, [chosen], generator.budget, keeper, details)


def _failed(
    prompt: str, generator: BudgetedGenerator, keeper: ScoreKeeper | None, details: dict, why: str
) -> SearchResult:
    details["failed"] = details["note"] = why
    return make_result("swarm", prompt, None, [], generator.budget, keeper, details)
