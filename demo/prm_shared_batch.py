"""The PRM in the policy's batch against separate scoring passes, on beam search + PRM.

Both paths run the same beam search (same problems, budget, seeds) on the one NF4 model that holds
the policy and the PRM adapters:

- **separate**: the library's sampler decodes the policy rows; each round the PRM re-reads every
  new prefix (prompt + steps so far) in its own batched forward (``StepScorer.score_batch``);
- **same batch**: :class:`~fastpeft.reasoning.scored_sampler.ScoredSampler` decodes policy and PRM
  rows in one routed forward per token; the PRM's score of each prefix comes out of the decode.

Times are the median over interleaved rounds (the machine is shared), reported as a ratio to the
separate path measured in the same round. The models-in-memory column compares with the
alternative of a second model for the verifier.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def score_differences(
    scored: Any, prm: Any, tokenizer: Any, prompts: list[str], step_tokens: int, st: Any
) -> list[float]:
    """|decode score - separate PRM pass| for sampled first steps, over the same token ids (texts are
    not compared: re-encoding a sampled text need not give back its tokens, e.g. ``<``, ``|``, ...
    sampled one by one re-encode as one added token)."""
    from fastpeft.reasoning.types import SamplingParams

    params = SamplingParams(max_new_tokens=step_tokens, temperature=st.temperature, stop=("; ",), seed=st.seed)
    rows, decoded = [], []
    for prompt, completions in zip(prompts, scored.generate(prompts, params, n=4)):
        for c in completions:
            tokens = c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids
            ids = [*tokenizer.encode(prompt), *tokens]
            rows.append((ids, [len(ids) - 1]))
            decoded.append(scored.scores[prompt + c.text])
    return [abs(d - sep) for d, (sep,) in zip(decoded, prm._forward(rows))]


def measure(
    model: Any, tokenizer: Any, prm: Any, problems: list[dict], s: Any, st: Any, budget: int = 1024, rounds: int = 3
) -> dict[str, Any]:
    from fastpeft.reasoning.sampler import Sampler
    from fastpeft.reasoning.scored_sampler import ScoredSampler
    from fastpeft.reasoning.search import search

    max_len = int(st.model_config["max_position_embeddings"])
    sampler = Sampler(model, tokenizer, max_seq_len=max_len)
    options = {
        "n": 8,
        "beam_width": 4,
        "stop": "; ",
        "max_steps": s.max_steps,
        "max_new_tokens": s.step_tokens,
        "temperature": st.temperature,
    }

    def separate() -> tuple[list, int]:
        prm._cache.clear()
        before = prm.forward_rows
        out = [
            search(sampler, p["prompt"], "beam_search", budget=budget, scorer=prm, seed=st.seed + i, **options)
            for i, p in enumerate(problems)
        ]
        return out, prm.forward_rows - before

    def joint() -> tuple[list, ScoredSampler]:
        scored = ScoredSampler(
            model, tokenizer, prm.model.head, verifier=prm.adapter, policy="policy", max_seq_len=max_len, fallback=prm
        )
        out = [
            search(scored, p["prompt"], "beam_search", budget=budget, scorer=scored, seed=st.seed + i, **options)
            for i, p in enumerate(problems)
        ]
        return out, scored

    times: dict[str, list[float]] = {"separate": [], "same batch": []}
    for k in range(rounds):
        for name in ("separate", "same batch") if k % 2 == 0 else ("same batch", "separate"):
            start = time.perf_counter()
            result = separate() if name == "separate" else joint()
            times[name].append(time.perf_counter() - start)
            if name == "separate":
                sep_results, score_rows = result
            else:
                joint_results, scored = result
    diffs = score_differences(scored, prm, tokenizer, [p["prompt"] for p in problems], s.step_tokens, st)
    ratios = [j / sep for j, sep in zip(times["same batch"], times["separate"])]
    one = _bytes(model) + _bytes(prm.model.head)
    base_only = sum(_bytes(m) for n, m in model.named_children())  # the same model, for the two-model estimate
    rows = [
        {
            "name": "separate passes (sampler + PRM re-reads prefixes)",
            "seconds": statistics.median(times["separate"]),
            "ratio": 1.0,
            "models": 1,
            "bytes": one,
        },
        {
            "name": "same batch (policy + PRM rows, one routed forward per token)",
            "seconds": statistics.median(times["same batch"]),
            "ratio": statistics.median(ratios),
            "models": 1,
            "bytes": one,
        },
        {
            "name": "a second model for the verifier (memory only)",
            "seconds": float("nan"),
            "ratio": float("nan"),
            "models": 2,
            "bytes": one + base_only,
        },
    ]
    agree = sum(a.answer == b.answer for a, b in zip(sep_results, joint_results)) / max(len(problems), 1)
    return {
        "rows": rows,
        "max_score_diff": max(diffs) if diffs else None,
        "scores_compared": len(diffs),
        "answers_agree": agree,
        "separate_prm_rows": score_rows,
        "same_batch_fallback_misses": scored.misses,
        "problems": len(problems),
        "budget": budget,
        "rounds": rounds,
        "round_seconds": times,
    }
