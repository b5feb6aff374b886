"""The swarm's control flow on a scripted mock: decompose -> one batched solve -> integrate, each
call on its role's adapter, all charged to one budget; early exits name the failing stage."""

from __future__ import annotations

import pytest

from fastpeft.demo.hard_tier import make_sum
from fastpeft.demo.swarm_task import decomposition, integration_prompt, make_multipart, parse_parts
from fastpeft.reasoning.search import search
from fastpeft.reasoning.types import Completion

QUESTION = make_multipart([3471, 5829, 9162, 2038])


class Roles:
    """Answers by adapter: the decomposer pairs operands, the solver is right except on one part's
    second sample, the integrator adds the part answers it is given."""

    def __init__(self, decompose_text=None):
        self.calls, self.decompose_text, self.tokens = [], decompose_text, 0

    def generate(self, prompts, params, n=1, adapters=None):
        self.calls.append((list(prompts), n, adapters, params.temperature))
        out = []
        for p in prompts:
            if adapters == "decomposer":
                texts = [self.decompose_text if self.decompose_text is not None else decomposition(p)]
            elif adapters == "solver":
                rec = make_sum(*map(int, p[3:-5].split("+")))
                texts = [rec["completion"] if j != 1 or "3471" not in p else " answer 1" for j in range(n)]
            else:
                answers = [int(x) for x in p.split("parts: ")[1].split("\n")[0].split(", ")]
                texts = [f" answer {sum(answers)}"]
            texts = [t[: params.max_new_tokens] for t in texts]  # one token per character
            self.tokens += sum(len(t) for t in texts)
            out.append([Completion(t, [0] * len(t), [0.0] * len(t), "eos") for t in texts])
        return out


def run(gen, **kw):
    return search(
        gen,
        QUESTION["prompt"],
        "swarm",
        budget=4096,
        max_new_tokens=160,
        parse_parts=parse_parts,
        integration_prompt=integration_prompt,
        **kw,
    )


def test_decompose_solve_integrate():
    gen = Roles()
    result = run(gen, samples_per_part=3)
    assert result.answer == QUESTION["answer"] == "20500"
    (p1, n1, a1, t1), (p2, n2, a2, _), (p3, n3, a3, t3) = gen.calls
    assert (p1, n1, a1, t1) == ([QUESTION["prompt"]], 1, "decomposer", 0.0)
    assert p2 == ["Q: 3471+5829=?\nA:", "Q: 9162+2038=?\nA:"] and (n2, a2) == (3, "solver")  # one batch
    assert p3 == ["Q: 3471+5829+9162+2038=?\nparts: 9300, 11200\nA:"] and (n3, a3, t3) == (1, "integrator", 0.0)
    assert result.details["part_answers"] == ["9300", "11200"]  # majority outvotes the wrong sample
    assert result.tokens_spent == gen.tokens  # every role's tokens are charged to the one budget


def test_early_exits_say_where():
    result = run(Roles(decompose_text=" no parts here"))
    assert result.answer is None and result.details["failed"] == "decomposition has no parts"
    with pytest.raises(ValueError, match="parse_parts"):
        search(Roles(), QUESTION["prompt"], "swarm", budget=512)
    with pytest.raises(ValueError, match="needs a scorer"):
        run(Roles(), aggregate="best")


@pytest.mark.parametrize("extra", [1, 5, 40])
def test_the_swarm_stops_within_its_budget(extra):
    """One token more than the decomposition: the parts cannot be afforded (one token per row), and
    the result says so; a few more: every stage runs on what is left, never past the budget."""
    budget = len(decomposition(QUESTION["prompt"])) + extra
    gen = Roles()
    result = search(
        gen,
        QUESTION["prompt"],
        "swarm",
        budget=budget,
        max_new_tokens=160,
        parse_parts=parse_parts,
        integration_prompt=integration_prompt,
    )
    assert result.tokens_spent == gen.tokens <= budget
    if extra == 1:
        assert result.answer is None and result.details["failed"] == "budget spent before the parts were solved"
