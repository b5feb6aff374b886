"""Compute budgets, so search strategies compare at equal compute.

A budget counts either generated tokens (``unit="tokens"``: the sum of every completion's
``num_tokens``) or generator forward passes (``unit="forward_passes"``: one batched generate call
with rows of at most L new tokens costs L passes, since each decode step is one forward pass of the
whole batch and prefill yields the first token). Verifier and reward-model calls are counted in
``scorer_calls`` and reported, not charged: the budget measures generator compute.

:class:`BudgetedGenerator` is the only way strategies reach the model. It shrinks each call's
``max_new_tokens`` so that no call can overshoot what is left, and refuses calls once the budget is
spent (:class:`BudgetExhausted`), so "stops when the budget is spent" holds for every strategy by
construction rather than by each strategy's care.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from fastpeft.reasoning.types import Completion, Generator, SamplingParams

BudgetUnit = Literal["tokens", "forward_passes"]
BUDGET_UNITS: tuple[str, ...] = ("tokens", "forward_passes")


class BudgetExhausted(RuntimeError):
    """Raised by :class:`BudgetedGenerator` when a call cannot afford even one token per row."""


@dataclasses.dataclass
class ComputeBudget:
    """A limit in ``unit`` and what was spent so far (tokens and forward passes are both tracked)."""

    limit: int
    unit: BudgetUnit = "tokens"
    tokens_spent: int = 0
    forward_passes: int = 0
    generate_calls: int = 0
    scorer_calls: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            raise TypeError(f"budget must be an int, got {type(self.limit).__name__} {self.limit!r}")
        if self.limit <= 0:
            raise ValueError(f"budget must be positive, got {self.limit}")
        if self.unit not in BUDGET_UNITS:
            raise ValueError(f"unknown budget unit {self.unit!r}; known units: {', '.join(BUDGET_UNITS)}")

    @property
    def spent(self) -> int:
        return self.tokens_spent if self.unit == "tokens" else self.forward_passes

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent)

    @property
    def exhausted(self) -> bool:
        return self.remaining <= 0

    def max_new_tokens_for(self, rows: int) -> int:
        """The most new tokens each of ``rows`` rows may generate in one call without overshooting."""
        if rows <= 0:
            raise ValueError(f"rows must be positive, got {rows}")
        return self.remaining // rows if self.unit == "tokens" else self.remaining

    def can_generate(self, rows: int) -> bool:
        """Whether one call of ``rows`` rows can get at least one new token each."""
        return self.max_new_tokens_for(rows) >= 1

    def rows_affordable(self, tokens_per_row: int) -> int:
        """How many rows of ``tokens_per_row`` new tokens one call can afford in full."""
        if tokens_per_row <= 0:
            raise ValueError(f"tokens_per_row must be positive, got {tokens_per_row}")
        if self.unit == "tokens":
            return self.remaining // tokens_per_row
        # every row of a batched call advances in the same forward passes
        return 10**9 if self.remaining >= tokens_per_row else 0

    def charge(self, completions: Sequence[Sequence[Completion]]) -> None:
        """Record one generate call's cost."""
        lengths = [c.num_tokens for row in completions for c in row]
        self.tokens_spent += sum(lengths)
        self.forward_passes += max(lengths, default=0)
        self.generate_calls += 1

    def summary(self) -> dict[str, int | str]:
        return {
            "budget": self.limit,
            "budget_unit": self.unit,
            "tokens_spent": self.tokens_spent,
            "forward_passes": self.forward_passes,
            "generate_calls": self.generate_calls,
            "scorer_calls": self.scorer_calls,
        }


class BudgetedGenerator:
    """Wraps any :class:`Generator`; charges every call to ``budget`` and never lets it overshoot.

    ``seed``: when set, call k uses ``seed + k`` so repeated calls differ yet a run is reproducible.
    """

    def __init__(self, generator: Generator, budget: ComputeBudget, seed: int | None = None) -> None:
        if not hasattr(generator, "generate"):
            raise TypeError(
                f"generator must have a generate(prompts, params, n) method, got {type(generator).__name__}"
            )
        self.generator = generator
        self.budget = budget
        self.seed = seed

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        n: int = 1,
        adapters: str | Sequence[str | None] | None = None,
    ) -> list[list[Completion]]:
        """Like :meth:`Generator.generate`, with ``max_new_tokens`` capped to what the budget allows."""
        if n <= 0 or not prompts:
            raise ValueError(f"need at least one prompt and n >= 1, got {len(prompts)} prompts and n={n}")
        cap = self.budget.max_new_tokens_for(len(prompts) * n)
        if cap < 1:
            raise BudgetExhausted(
                f"{self.budget.unit} budget spent ({self.budget.spent}/{self.budget.limit}); "
                f"cannot generate {len(prompts) * n} rows"
            )
        changes: dict[str, object] = {}
        if params.max_new_tokens > cap:
            changes["max_new_tokens"] = cap
        if self.seed is not None:
            changes["seed"] = self.seed + self.budget.generate_calls
        if changes:
            params = dataclasses.replace(params, **changes)
        out = self.generator.generate(list(prompts), params, n=n, adapters=adapters)
        if len(out) != len(prompts) or any(len(row) != n for row in out):
            raise ValueError(
                f"generator returned {[len(r) for r in out]} completions for {len(prompts)} prompts x n={n}"
            )
        too_long = [c.num_tokens for row in out for c in row if c.num_tokens > params.max_new_tokens]
        self.budget.charge(out)
        if too_long:
            # a generator that ignores max_new_tokens would silently break equal-compute comparisons
            raise ValueError(
                f"generator returned completions of {max(too_long)} tokens, "
                f"above max_new_tokens={params.max_new_tokens}"
            )
        return out
