"""A stack of verifiers combined into one score, with failures reported rather than hidden.

Combination (scores in [0, 1]):
- ``"product"`` (default): prod(s_i ** w_i); with unit weights the plain product, so any one
  verifier near 0 sinks the answer.
- ``"weighted_mean"``: sum(w_i * s_i) / sum(w_i).

Failures: a verifier that raises, times out (``timeout_s``), or returns a value outside [0, 1] is
listed in the report's ``problems`` with its name, the kind of failure and the message. With
``on_failure="exclude"`` (default) it is left out of the combination, which then covers the
verifiers that did answer; if none answered the score is 0.0, since nothing vouched for the
response. With ``on_failure="zero"`` it counts as a score of 0.0.

Timeouts run each verifier in a worker thread and stop waiting after ``timeout_s``; Python cannot
kill a thread, so a runaway verifier keeps running in the background until it returns (verifiers
here never execute model-written code, so that is a cost, not a safety issue).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fastpeft.reasoning.types import Scorer

COMBINES = ("product", "weighted_mean")
ON_FAILURE = ("exclude", "zero")


@dataclasses.dataclass
class StackReport:
    """The combined ``score``, each verifier's score, and what went wrong (if anything)."""

    score: float
    scores: dict[str, float]
    problems: list[dict[str, Any]]


class VerifierStack:
    """Several scorers as one :class:`Scorer`; :meth:`evaluate` gives the full report."""

    def __init__(
        self,
        verifiers: Mapping[str, Scorer] | Sequence[tuple[str, Scorer]],
        weights: Mapping[str, float] | None = None,
        combine: Literal["product", "weighted_mean"] = "product",
        timeout_s: float | None = None,
        on_failure: Literal["exclude", "zero"] = "exclude",
    ) -> None:
        items = list(verifiers.items() if isinstance(verifiers, Mapping) else verifiers)
        if not items:
            raise ValueError("a verifier stack needs at least one verifier")
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"verifier names must be unique, got {names}")
        for name, v in items:
            if not hasattr(v, "score"):
                raise TypeError(f"verifier {name!r} has no score(prompt, response) method ({type(v).__name__})")
        if combine not in COMBINES:
            raise ValueError(f"unknown combine {combine!r}; known: {', '.join(COMBINES)}")
        if on_failure not in ON_FAILURE:
            raise ValueError(f"unknown on_failure {on_failure!r}; known: {', '.join(ON_FAILURE)}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        weights = dict(weights or {})
        unknown = set(weights) - set(names)
        if unknown:
            raise ValueError(f"weights for unknown verifiers {sorted(unknown)}; verifiers: {names}")
        if any(w < 0 or not math.isfinite(w) for w in weights.values()):
            raise ValueError(f"weights must be finite and >= 0, got {weights}")
        self.verifiers = items
        self.weights = {n: float(weights.get(n, 1.0)) for n in names}
        self.combine, self.timeout_s, self.on_failure = combine, timeout_s, on_failure

    def _run_all(self, prompt: str, response: str) -> dict[str, tuple[str, Any]]:
        """name -> ("ok", score) | ("error", message) | ("timeout", message)."""
        out: dict[str, tuple[str, Any]] = {}
        if self.timeout_s is None:
            for name, v in self.verifiers:
                try:
                    out[name] = ("ok", v.score(prompt, response))
                except Exception as e:  # any verifier failure is reported, by design
                    out[name] = ("error", f"{type(e).__name__}: {e}")
            return out
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.verifiers))
        try:
            futures = {name: pool.submit(v.score, prompt, response) for name, v in self.verifiers}
            done, _ = concurrent.futures.wait(futures.values(), timeout=self.timeout_s)
            for name, fut in futures.items():
                if fut not in done:
                    out[name] = ("timeout", f"no answer within {self.timeout_s}s")
                elif fut.exception() is not None:
                    e = fut.exception()
                    out[name] = ("error", f"{type(e).__name__}: {e}")
                else:
                    out[name] = ("ok", fut.result())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # do not wait for a runaway verifier
        return out

    def evaluate(self, prompt: str, response: str) -> StackReport:
        scores: dict[str, float] = {}
        problems: list[dict[str, Any]] = []
        for name, (status, value) in self._run_all(prompt, response).items():
            if status == "ok":
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    status, value = "error", f"returned {value!r}, not a number"
                else:
                    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                        status, value = "error", f"returned {value}, outside [0, 1]"
            if status == "ok":
                scores[name] = value
                continue
            problems.append({"verifier": name, "kind": status, "message": value, "policy": self.on_failure})
            if self.on_failure == "zero":
                scores[name] = 0.0
        return StackReport(self._combine(scores), scores, problems)

    def _combine(self, scores: Mapping[str, float]) -> float:
        if not scores:
            return 0.0
        if self.combine == "product":
            return math.prod(s ** self.weights[n] for n, s in scores.items())
        total = sum(self.weights[n] for n in scores)
        if total == 0:
            raise ValueError(f"all weights of the verifiers that answered are 0: {sorted(scores)}")
        return sum(self.weights[n] * s for n, s in scores.items()) / total

    def score(self, prompt: str, response: str) -> float:
        return self.evaluate(prompt, response).score
