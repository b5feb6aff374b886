"""The swarm (decompose -> solve parts -> integrate) against a single agent on multi-part sums.

Every role is an adapter on the one NF4 base the policy and the verifiers share: ``decomposer``,
``integrator`` and ``single`` (QLoRA SFT adapters, :func:`fastpeft.demo.prm_stages.train_roles`),
the policy adapter solves the parts. Compared at equal compute: greedy roles against the single
agent's greedy answer, and the swarm with a majority vote over samples of each part against the
single agent's majority vote over as many samples as the same mean token count buys.
"""

from __future__ import annotations

import math
from typing import Any

from fastpeft.demo.prm_stages import StageSettings
from fastpeft.demo.swarm_task import integration_prompt, make_multipart_dataset, parse_parts


def _row(name: str, results: list, answers: list[str], roles: str) -> dict[str, Any]:
    from fastpeft.reasoning.answers import answers_match

    correct = [answers_match(r.answer, a) for r, a in zip(results, answers)]
    acc = sum(correct) / len(correct)
    return {
        "name": name,
        "accuracy": acc,
        "se": math.sqrt(acc * (1 - acc) / len(correct)),
        "correct": correct,
        "mean_tokens": sum(r.tokens_spent for r in results) / len(results),
        "roles": roles,
    }


def compare(
    model: Any,
    tokenizer: Any,
    roles: dict[str, dict],
    n: int,
    st: StageSettings,
    max_len: int,
    samples_per_part: int = 5,
) -> dict[str, Any]:
    import fastpeft
    from fastpeft.reasoning.sampler import Sampler
    from fastpeft.reasoning.search import search

    for role, info in roles.items():
        if role not in fastpeft.list_adapters(model):
            fastpeft.load_adapter(model, info["saved"], adapter_name=role, activate=False)
    sampler = Sampler(model, tokenizer, max_seq_len=max_len)
    trained = {r["prompt"] for r in make_multipart_dataset(st.role_problems, seed=st.seed + 5)}
    problems = make_multipart_dataset(n, seed=st.seed + 9, exclude=trained)
    prompts, answers = [p["prompt"] for p in problems], [p["answer"] for p in problems]
    tokens = st.max_new_tokens
    swarm_roles = "decomposer, policy (parts, one batch), integrator"

    def swarm(samples: int, temperature: float) -> list:
        return [
            search(
                sampler,
                p,
                "swarm",
                budget=8192,
                parse_parts=parse_parts,
                integration_prompt=integration_prompt,
                decomposer="decomposer",
                solver="policy",
                integrator="integrator",
                samples_per_part=samples,
                max_new_tokens=tokens,
                temperature=temperature,
                seed=st.seed + i,
            )
            for i, p in enumerate(prompts)
        ]

    def single(strategy: str, budget: int, temperature: float) -> list:
        return [
            search(
                sampler,
                p,
                strategy,
                budget=budget,
                adapter="single",
                max_new_tokens=tokens,
                temperature=temperature,
                seed=st.seed + i,
                **({"n": 10_000} if strategy != "greedy" else {}),
            )
            for i, p in enumerate(prompts)
        ]

    greedy_swarm = swarm(1, 0.0)
    voted_swarm = swarm(samples_per_part, st.temperature)
    matched = max(tokens + 1, round(sum(r.tokens_spent for r in voted_swarm) / len(voted_swarm)))
    rows = [
        _row("swarm, greedy roles", greedy_swarm, answers, swarm_roles),
        _row("single agent, greedy", single("greedy", tokens + 1, 0.0), answers, "single"),
        _row(f"swarm, majority of {samples_per_part} samples per part", voted_swarm, answers, swarm_roles),
        _row(
            f"single agent, majority vote at {matched} tokens",
            single("majority_vote", matched, st.temperature),
            answers,
            "single",
        ),
    ]
    failed = sum(1 for r in greedy_swarm if r.details.get("failed"))
    return {
        "rows": rows,
        "problems": len(problems),
        "greedy_swarm_failures": failed,
        "example": greedy_swarm[0].details if greedy_swarm else {},
    }
