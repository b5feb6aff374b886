"""The small protocols that connect the sampler, the search strategies and the verifiers.

Strategies depend only on these, so tests can drive them with a mock generator on CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "eos", "length"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one continuation.

    ``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1.0`` disable those filters;
    generation of a row ends at EOS, at any string in ``stop`` (kept in the text), or after
    ``max_new_tokens``.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass
class Completion:
    """One sampled continuation of one prompt."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    finish_reason: FinishReason

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class Generator(Protocol):
    """Anything that continues prompts: the batched sampler, or a mock in tests."""

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        n: int = 1,
        adapters: str | Sequence[str | None] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions for each prompt: result[i][j] is the j-th sample of prompts[i].

        ``adapters`` names the adapter each prompt's rows use (one name for all, or one per
        prompt; None = the model's active adapter).
        """
        ...


@runtime_checkable
class Scorer(Protocol):
    """Scores texts in [0, 1]: verifiers, process/outcome reward models."""

    def score(self, prompt: str, response: str) -> float: ...
