"""Learned verifiers: an outcome or process reward model behind the :class:`Scorer` protocol.

Any scorer works (for example the scalar-head reward adapter from the RL recipes, or a plain
function wrapped in :class:`CallableScorer`). In ``outcome`` mode the model scores the whole
response once. In ``process`` mode it scores every prefix that ends at a step delimiter and the
step scores are reduced with ``min`` (a chain is as good as its worst step), ``last``, ``mean`` or
``product``. Prefix scores are cached, because step-level search asks for each prefix again as the
response grows.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from fastpeft.reasoning.types import Scorer

_REDUCE: dict[str, Callable[[list[float]], float]] = {
    "min": min,
    "last": lambda xs: xs[-1],
    "mean": lambda xs: sum(xs) / len(xs),
    "product": math.prod,
}


class CallableScorer:
    """Adapts a function ``(prompt, response) -> float in [0, 1]`` to the Scorer protocol."""

    def __init__(self, fn: Callable[[str, str], float]) -> None:
        if not callable(fn):
            raise TypeError(f"expected a callable (prompt, response) -> float, got {type(fn).__name__}")
        self.fn = fn

    def score(self, prompt: str, response: str) -> float:
        return float(self.fn(prompt, response))


def split_steps(response: str, delimiter: str) -> list[str]:
    """Cumulative prefixes of ``response`` ending at each ``delimiter`` (kept), plus the tail."""
    if not delimiter:
        raise ValueError("step delimiter must be non-empty")
    prefixes, start = [], 0
    while True:
        i = response.find(delimiter, start)
        if i < 0:
            break
        start = i + len(delimiter)
        prefixes.append(response[:start])
    if start < len(response) or not prefixes:
        prefixes.append(response)
    return prefixes


class LearnedVerifier:
    """Outcome or process reward model; see the module docstring."""

    def __init__(
        self,
        model: Scorer,
        mode: Literal["outcome", "process"] = "outcome",
        step_delimiter: str = "\n",
        reduce: Literal["min", "last", "mean", "product"] = "min",
        cache_size: int = 4096,
    ) -> None:
        if not hasattr(model, "score"):
            raise TypeError(f"model must have score(prompt, response), got {type(model).__name__}")
        if mode not in ("outcome", "process"):
            raise ValueError(f"mode must be 'outcome' or 'process', got {mode!r}")
        if reduce not in _REDUCE:
            raise ValueError(f"unknown reduce {reduce!r}; known: {', '.join(_REDUCE)}")
        self.model, self.mode, self.reduce = model, mode, reduce
        self.step_delimiter = step_delimiter
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._cache_size = cache_size

    def _model_score(self, prompt: str, text: str) -> float:
        key = (prompt, text)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = float(self.model.score(prompt, text))
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"reward model {type(self.model).__name__} returned {value}, outside [0, 1]")
        self._cache[key] = value
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return value

    def step_scores(self, prompt: str, response: str) -> list[float]:
        """One score per step prefix (process mode's raw signal)."""
        return [self._model_score(prompt, p) for p in split_steps(response, self.step_delimiter)]

    def score(self, prompt: str, response: str) -> float:
        if self.mode == "outcome":
            return self._model_score(prompt, response)
        return _REDUCE[self.reduce](self.step_scores(prompt, response))
