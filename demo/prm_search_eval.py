"""Search evaluation for the PRM evidence: every configuration on every problem of a split, with
per-problem outcomes kept so differences get paired standard errors.

Best-of-N-family configurations (best-of-N with the ORM, the PRM or the oracle, weighted best-of-N,
majority vote) read their samples from one :class:`SamplePool` per problem: i.i.d. policy samples
drawn in fixed chunks with fixed seeds, so every selector at every budget sees the same samples
(the usual way best-of-N curves are computed) and the pool is sampled once. Step-level search
(beam search, today's fixed-threshold allocation) runs live on the sampler.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fastpeft.reasoning.allocation import DifficultyEstimator, OutcomeHistory
from fastpeft.reasoning.answers import answers_match
from fastpeft.reasoning.search import search
from fastpeft.reasoning.types import Completion, Generator, SamplingParams

POOL_STRATEGIES = ("best_of_n", "weighted_best_of_n", "majority_vote")
_EVAL_KEYS = ("scorer", "source", "budget", "strategy")  # configuration keys that are not search options


class SamplePool:
    """Shared i.i.d. samples per prompt (module docstring); :meth:`view` starts a fresh reader."""

    def __init__(self, sampler: Generator, tokenizer: Any, params: SamplingParams, chunk: int = 16, seed: int = 0):
        self.sampler, self.tokenizer, self.params, self.chunk, self.seed = sampler, tokenizer, params, chunk, seed
        self.samples: dict[str, list[Completion]] = {}
        self.tokens_sampled = 0

    def take(self, prompt: str, start: int, n: int) -> list[Completion]:
        pool = self.samples.setdefault(prompt, [])
        while len(pool) < start + n:
            seed = self.seed + 1000 * (zlib.crc32(prompt.encode()) % 1_000_000) + len(pool) // self.chunk
            new = self.sampler.generate([prompt], dataclasses.replace(self.params, seed=seed), n=self.chunk)[0]
            self.tokens_sampled += sum(c.num_tokens for c in new)
            pool.extend(new)
        return pool[start : start + n]

    def view(self) -> _PoolView:
        return _PoolView(self)


class _PoolView:
    """A Generator over the pool: call after call, the next samples of the prompt, cut to
    ``params.max_new_tokens`` (a cut sample ends with ``finish_reason="length"``)."""

    def __init__(self, pool: SamplePool) -> None:
        self.pool, self.cursor = pool, {}

    def generate(self, prompts: Sequence[str], params: SamplingParams, n: int = 1, adapters: Any = None):
        if params.temperature != self.pool.params.temperature:
            raise ValueError(
                f"the pool holds samples at temperature {self.pool.params.temperature}, asked for {params.temperature}"
            )
        out = []
        for prompt in prompts:
            start = self.cursor.get(prompt, 0)
            self.cursor[prompt] = start + n
            row = []
            for c in self.pool.take(prompt, start, n):
                cap = params.max_new_tokens
                if c.num_tokens > cap:
                    ids = c.token_ids[:cap]
                    c = Completion(self.pool.tokenizer.decode(ids), ids, c.token_logprobs[:cap], "length")
                row.append(c)
            out.append(row)
        return out


@dataclasses.dataclass
class ConfigResult:
    """One configuration on one split: per-problem correctness and tokens."""

    label: str
    config: dict[str, Any]
    correct: list[bool]
    tokens: list[int]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def mean_tokens(self) -> float:
        return sum(self.tokens) / len(self.tokens)

    def row(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "strategy": self.config["strategy"],
            "budget": self.config["budget"],
            "scorer": self.config.get("scorer"),
            "accuracy": self.accuracy,
            "se": binomial_se(self.correct),
            "mean_tokens": self.mean_tokens,
            "n": len(self.correct),
        }


def binomial_se(outcomes: Sequence[bool | float]) -> float:
    n = len(outcomes)
    p = sum(outcomes) / n
    return math.sqrt(p * (1 - p) / n)


def paired_difference(a: Sequence[bool | float], b: Sequence[bool | float]) -> tuple[float, float]:
    """Mean of ``a_i - b_i`` and its standard error (same problems, so the pairing removes shared noise)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes need equal non-zero lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


def problem_seed(seed: int, index: int) -> int:
    return seed + 1_000_003 * index


def run_configs(
    configs: Mapping[str, Mapping[str, Any]],
    problems: Sequence[Mapping[str, str]],
    sampler: Generator,
    pool: SamplePool,
    scorers: Mapping[str, Callable[[Mapping[str, str]], Any]],
    temperature: float,
    seed: int,
    progress: bool = True,
    cache: Path | None = None,
    cache_key: Any = None,
) -> dict[str, ConfigResult]:
    """Run every configuration on every problem. ``scorers[name](problem)`` gives the scorer a
    configuration's ``"scorer"`` names (per problem, so the oracle can know the answer).

    With ``cache`` (a directory), each configuration's outcomes are kept in ``<label>.json`` with
    ``cache_key`` (what they depend on: models, problems, seed) and reused while it matches.
    """
    out = {}
    bar = tqdm(total=len(configs) * len(problems), desc="search", disable=not progress)
    for label, config in configs.items():
        key = json.dumps(
            {
                "config": config,
                "problems": [p["prompt"] for p in problems],
                "seed": seed,
                "temperature": temperature,
                "models": cache_key,
            },
            sort_keys=True,
            default=str,
        )
        path = cache / f"{label}.json" if cache is not None else None
        if path is not None and path.exists() and json.loads(path.read_text())["key"] == key:
            saved = json.loads(path.read_text())
            out[label] = ConfigResult(label, dict(config), saved["correct"], saved["tokens"])
            bar.update(len(problems))
            continue
        cfg = dict(config)
        history = OutcomeHistory() if cfg["strategy"] == "dynamic_allocation" else None
        correct, tokens = [], []
        for i, prob in enumerate(problems):
            generator = pool.view() if cfg.get("source") == "pool" else sampler
            options = {k: v for k, v in cfg.items() if k not in _EVAL_KEYS}
            if history is not None:
                options["estimator"] = DifficultyEstimator(history=history)
            scorer = scorers[cfg["scorer"]](prob) if cfg.get("scorer") else None
            result = search(
                generator,
                prob["prompt"],
                cfg["strategy"],
                budget=cfg["budget"],
                scorer=scorer,
                temperature=temperature,
                seed=problem_seed(seed, i),
                **options,
            )
            ok = answers_match(result.answer, prob["answer"])
            correct.append(ok)
            tokens.append(result.tokens_spent)
            if history is not None:
                history.add(prob["prompt"], ok)
            bar.update(1)
        out[label] = ConfigResult(label, dict(config), correct, tokens)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key, "correct": correct, "tokens": tokens}))
    bar.close()
    return out


def search_configs(
    budgets: Sequence[int], response_tokens: int, step_tokens: int, max_steps: int, fixed_allocation: bool = True
) -> dict[str, dict[str, Any]]:
    """The configurations compared at each budget (labels ``name@budget``)."""
    full = {"max_new_tokens": response_tokens, "n": 10_000}  # N: as many samples as the budget pays for
    out: dict[str, dict[str, Any]] = {
        "greedy": {"strategy": "greedy", "budget": response_tokens + 1, "max_new_tokens": response_tokens}
    }
    for b in budgets:
        out[f"bon_orm@{b}"] = {"strategy": "best_of_n", "budget": b, "scorer": "orm", "source": "pool", **full}
        out[f"bon_prm@{b}"] = {"strategy": "best_of_n", "budget": b, "scorer": "prm", "source": "pool", **full}
        out[f"weighted_orm@{b}"] = {
            "strategy": "weighted_best_of_n",
            "budget": b,
            "scorer": "orm",
            "source": "pool",
            **full,
        }
        out[f"majority@{b}"] = {"strategy": "majority_vote", "budget": b, "source": "pool", **full}
        out[f"bon_oracle@{b}"] = {"strategy": "best_of_n", "budget": b, "scorer": "oracle", "source": "pool", **full}
        width = 2 if b < 1024 else 4
        n = max(width, (b // 100) // width * width)  # a response is ~75 tokens; steps reserve 28 each
        out[f"beam_prm@{b}"] = {
            "strategy": "beam_search",
            "budget": b,
            "scorer": "prm",
            "n": n,
            "beam_width": width,
            "max_new_tokens": step_tokens,
            "stop": "; ",
            "max_steps": max_steps,
        }
        if fixed_allocation:
            out[f"fixed_allocation@{b}"] = {
                "strategy": "dynamic_allocation",
                "budget": b,
                "scorer": "prm",
                "max_new_tokens": step_tokens,
                "stop": "; ",
                "beam_n": max(3, n // 3 * 3),
                "beam_width": 3,
                "mcts_depth": max_steps,
            }
    return out


def family(label: str) -> str:
    return label.split("@")[0]
