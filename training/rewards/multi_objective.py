"""Combine several reward functions into one, safely.

    total_i = Σ_k w_k · r_k(prompt_i, completion_i, record_i)  −  λ_det · detector.score(prompt_i, completion_i)

- **Skip, never crash**: a reward function that raises, or returns None, NaN or ±inf for a sample
  marks that sample skipped (``total = None``); a warning names the function, the count and the
  first error, and :attr:`RewardBatch.failures` counts them for the metrics. Trainers give skipped
  samples no advantage and no loss, so one bad sample never poisons the batch.
- **Against reward hacking**: several objectives with weights (a hackable proxy weighs only part
  of the total), the trainers' KL term to the reference policy, and an optional adversarial
  ``detector`` (any :class:`~fastpeft.reasoning.types.Scorer`, e.g.
  :class:`~fastpeft.training.rewards.hacking.HackingDetector`) whose score, the probability that
  an output games the reward, is subtracted.

A function with a ``score_batch(prompts, completions, records)`` method (e.g. the sandboxed code
reward, which runs its sandboxes in parallel) is called once per batch; if that call raises, its
samples are retried one by one so only the failing ones are skipped.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

RewardFn = Callable[[str, str, Mapping[str, Any]], float | None]
# the names build_reward knows; "arithmetic" is accepted for "answer" (its name in older configs)
BUILTIN_REWARDS = ("answer", "format", "code", "process", "length")


@dataclasses.dataclass
class RewardBatch:
    """Rewards of one batch: ``totals[i]`` is None when sample i was skipped."""

    totals: list[float | None]
    components: dict[str, list[float | None]]
    failures: dict[str, int]
    detector: list[float | None] | None = None

    @property
    def num_skipped(self) -> int:
        return sum(t is None for t in self.totals)

    def tensor(self) -> torch.Tensor:
        """``[N]`` float32 totals, NaN where skipped."""
        return torch.tensor([math.nan if t is None else t for t in self.totals], dtype=torch.float32)

    def valid(self) -> torch.Tensor:
        """``[N]`` bool: the samples that have a reward."""
        return torch.tensor([t is not None for t in self.totals], dtype=torch.bool)

    def summary(self) -> dict[str, float | int | None]:
        """Metrics: mean/std of the valid totals, each component's mean, skipped-sample count."""

        def mean(xs: Sequence[float | None]) -> float | None:
            vals = [x for x in xs if x is not None]
            return sum(vals) / len(vals) if vals else None

        vals = [t for t in self.totals if t is not None]
        out: dict[str, float | int | None] = {"reward_mean": mean(self.totals), "reward_skipped": self.num_skipped}
        out["reward_std"] = float(torch.tensor(vals).std(unbiased=False)) if vals else None
        for name, xs in self.components.items():
            out[f"reward_{name}"] = mean(xs)
        if self.detector is not None:
            out["reward_detector"] = mean(self.detector)
        return out


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class MultiObjectiveReward:
    """Weighted reward functions plus an optional subtracted detector; see the module docstring."""

    def __init__(
        self,
        objectives: Mapping[str, RewardFn] | Sequence[tuple[str, RewardFn]],
        weights: Mapping[str, float] | None = None,
        detector: Any = None,
        detector_weight: float = 1.0,
    ):
        items = list(objectives.items() if isinstance(objectives, Mapping) else objectives)
        if not items:
            raise ValueError("MultiObjectiveReward needs at least one reward function")
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        for name, fn in items:
            if not callable(fn):
                raise TypeError(f"reward {name!r} is not callable ({type(fn).__name__})")
        weights = dict(weights or {})
        unknown = set(weights) - set(names)
        if unknown:
            raise ValueError(f"weights given for unknown rewards {sorted(unknown)}; rewards: {names}")
        if any(not math.isfinite(w) for w in weights.values()):
            raise ValueError(f"reward weights must be finite, got {weights}")
        if detector is not None and not hasattr(detector, "score"):
            raise TypeError(f"detector must have score(prompt, response), got {type(detector).__name__}")
        if not (math.isfinite(detector_weight) and detector_weight >= 0):
            raise ValueError(f"detector_weight must be finite and >= 0, got {detector_weight}")
        self.objectives = items
        self.weights = {n: float(weights.get(n, 1.0)) for n in names}
        self.detector, self.detector_weight = detector, float(detector_weight)

    def _run(
        self,
        name: str,
        fn: Callable,
        prompts: Sequence[str],
        completions: Sequence[str],
        records: Sequence[Mapping[str, Any]],
    ) -> tuple[list[float | None], list[str]]:
        errors: list[str] = []
        if hasattr(fn, "score_batch"):
            try:
                values = list(fn.score_batch(prompts, completions, records))
                if len(values) != len(prompts):
                    raise ValueError(f"score_batch returned {len(values)} rewards for {len(prompts)} samples")
            except Exception as err:
                errors.append(f"batch call: {type(err).__name__}: {err}")
            else:
                out = [_finite(v) for v in values]
                errors += [f"returned {v!r}" for v, o in zip(values, out) if o is None]
                return out, errors
        out = []
        for p, c, r in zip(prompts, completions, records):
            try:
                value = fn(p, c, r)
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
                out.append(None)
                continue
            out.append(_finite(value))
            if out[-1] is None:
                errors.append(f"returned {value!r}")
        return out, errors

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping[str, Any]] | None = None
    ) -> RewardBatch:
        records = list(records) if records is not None else [{} for _ in prompts]
        if not (len(prompts) == len(completions) == len(records)):
            raise ValueError(f"got {len(prompts)} prompts, {len(completions)} completions, {len(records)} records")
        components: dict[str, list[float | None]] = {}
        failures: dict[str, int] = {}
        for name, fn in self.objectives:
            values, errors = self._run(name, fn, prompts, completions, records)
            components[name] = values
            failures[name] = sum(v is None for v in values)
            if failures[name]:
                warnings.warn(
                    f"reward {name!r} failed on {failures[name]}/{len(values)} samples (first: "
                    f"{errors[0][:200] if errors else 'invalid value'}); those samples are skipped",
                    RuntimeWarning,
                    stacklevel=2,
                )
        detector = None
        if self.detector is not None:
            detector, errors = self._run(
                "detector", lambda p, c, r: self.detector.score(p, c), prompts, completions, records
            )
            failures["detector"] = sum(v is None for v in detector)
            if failures["detector"]:
                warnings.warn(
                    f"the hacking detector failed on {failures['detector']} samples; they are skipped",
                    RuntimeWarning,
                    stacklevel=2,
                )
        totals: list[float | None] = []
        for i in range(len(prompts)):
            parts = [components[n][i] for n, _ in self.objectives]
            det = detector[i] if detector is not None else 0.0
            if any(p is None for p in parts) or det is None:
                totals.append(None)
                continue
            total = sum(self.weights[n] * components[n][i] for n, _ in self.objectives)
            totals.append(total - self.detector_weight * det)
        return RewardBatch(totals, components, failures, detector)


def build_reward(names: Sequence[str] | Mapping[str, float], **options: Any) -> MultiObjectiveReward:
    """A :class:`MultiObjectiveReward` from built-in reward names (:data:`BUILTIN_REWARDS`: ``answer``,
    the final answer against ``record["answer"]``; ``format``; ``code``; ``process``; ``length``), a
    list (unit weights) or a name -> weight mapping.
    ``options`` go to the rewards that take them: ``code_limits`` (a dict of
    :class:`~fastpeft.training.rewards.code_sandbox.SandboxLimits` fields), ``code_isolation``
    (``"bwrap"``, the default, or ``"unsafe-rlimits-only"``), ``process_weights``."""
    from fastpeft.training.rewards.code_sandbox import CodeReward, SandboxLimits
    from fastpeft.training.rewards.hacking import length_reward
    from fastpeft.training.rewards.outcome import answer_format_reward, answer_reward
    from fastpeft.training.rewards.process import StepCheckerReward

    weights = dict(names) if isinstance(names, Mapping) else dict.fromkeys(names, 1.0)
    factories: dict[str, Callable[[], RewardFn]] = {
        "answer": lambda: answer_reward,
        "arithmetic": lambda: answer_reward,
        "format": lambda: answer_format_reward,
        "code": lambda: CodeReward(
            SandboxLimits(**options.get("code_limits", {})), isolation=options.get("code_isolation", "bwrap")
        ),
        "process": lambda: StepCheckerReward(weights=options.get("process_weights")),
        "length": lambda: length_reward,
    }
    unknown = [n for n in weights if n not in factories]
    if unknown or not weights:
        raise ValueError(f"unknown reward(s) {unknown}; built-in rewards: {list(BUILTIN_REWARDS)}")
    return MultiObjectiveReward({n: factories[n]() for n in weights}, weights)
