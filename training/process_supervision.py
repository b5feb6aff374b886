"""Process supervision for GRPO: per-token advantages from a process reward model's step scores.

Outcome-supervised GRPO gives every token of a completion the same group-normalised advantage.
With process supervision (Shao et al. 2024, DeepSeekMath §4.1.3) a PRM scores every step
``j`` of every completion in a group, the scores are normalised over all steps of the group,

    r̃_j = (r_j − mean(R_group)) / (std(R_group) + eps),

and token ``t`` gets the sum of the normalised rewards of the steps that end at or after it,

    A_t = Σ_{j : end(j) >= t} r̃_j,

so a token is credited for what its step and the steps after it earned. Tokens after the last
step boundary (the EOS) get the last step's ``r̃``.

:class:`ProcessSupervisionReward` plugs into :func:`fastpeft.training.grpo.train` as its
``reward``: called on a batch it returns a :class:`~fastpeft.training.rewards.RewardBatch` (total =
mean step score, for the logs; ``monitor`` rewards are logged beside it, never trained on) and its
:meth:`token_advantages` replaces the sequence advantages.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from fastpeft.training.rewards.multi_objective import RewardBatch, RewardFn
from fastpeft.training.rollout import RolloutBatch
from fastpeft.training.step_labels import step_ends


class StepScoring(Protocol):
    def step_scores(self, prompt: str, response: str) -> list[float]: ...


def token_step_index(token_texts: Sequence[str], char_ends: Sequence[int]) -> list[int]:
    """For each token (its decoded text, in order), the index of the first step ending at or after
    it; tokens past the last boundary get the last step. ``[]`` steps -> all -1."""
    if not char_ends:
        return [-1] * len(token_texts)
    out, start = [], 0
    for text in token_texts:
        # the token holds characters [start, start + len): it belongs to the step whose end covers its last one
        last = start + max(len(text), 1)
        out.append(min(bisect.bisect_left(char_ends, last), len(char_ends) - 1))
        start += len(text)
    return out


def process_advantages(
    step_rewards: Sequence[Sequence[float]],
    token_steps: Sequence[Sequence[int]],
    group_size: int,
    width: int,
    valid: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Per-token advantages ``[N, width]`` (module docstring formula).

    ``step_rewards[i]``: the PRM score of each step of completion i; ``token_steps[i][t]``: the step
    token t belongs to (-1: none). Invalid completions (``valid`` False) get 0 and are left out of
    their group's mean and std, like outcome advantages.
    """
    n = len(step_rewards)
    if n % group_size or len(token_steps) != n:
        raise ValueError(f"{n} completions ({len(token_steps)} token maps) do not split into groups of {group_size}")
    valid = torch.ones(n, dtype=torch.bool) if valid is None else valid.bool().cpu()
    adv = torch.zeros((n, width), dtype=torch.float32)
    for g in range(0, n, group_size):
        members = [i for i in range(g, g + group_size) if valid[i] and step_rewards[i]]
        pooled = torch.tensor([r for i in members for r in step_rewards[i]], dtype=torch.float64)
        if pooled.numel() == 0:
            continue
        mean, std = pooled.mean(), pooled.std(unbiased=False)
        for i in members:
            normed = (torch.tensor(step_rewards[i], dtype=torch.float64) - mean) / (std + eps)
            suffix = normed.flip(0).cumsum(0).flip(0)  # suffix[j] = Σ_{k >= j} r̃_k
            steps = torch.tensor(token_steps[i][:width], dtype=torch.long)
            known = steps >= 0
            row = torch.zeros(len(steps), dtype=torch.float64)
            row[known] = suffix[steps[known]]
            adv[i, : len(steps)] = row.float()
    return adv


class ProcessSupervisionReward:
    """GRPO reward from a PRM's step scores (see the module docstring).

    ``prm``: anything with ``step_scores(prompt, response) -> [float per step]`` (a
    :class:`~fastpeft.training.step_reward_model.StepScorer`); ``tokenizer`` decodes completion
    tokens to map them onto steps.
    """

    def __init__(
        self,
        prm: StepScoring,
        tokenizer: Any,
        delimiter: str = "; ",
        name: str = "prm",
        monitor: Mapping[str, RewardFn] | None = None,
    ) -> None:
        if not hasattr(prm, "step_scores"):
            raise TypeError(f"prm must have step_scores(prompt, response), got {type(prm).__name__}")
        self.prm, self.tokenizer, self.delimiter, self.name = prm, tokenizer, delimiter, name
        self.monitor = dict(monitor or {})  # logged as reward components, never trained on
        self._last: list[list[float]] = []

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping[str, Any]]
    ) -> RewardBatch:
        self._last = [list(self.prm.step_scores(p, c)) for p, c in zip(prompts, completions)]
        totals = [sum(s) / len(s) if s else None for s in self._last]
        components = {self.name: list(totals)}
        for key, fn in self.monitor.items():
            components[key] = [float(fn(p, c, r)) for p, c, r in zip(prompts, completions, records)]
        return RewardBatch(totals, components, {self.name: sum(t is None for t in totals)})

    def token_advantages(self, batch: RolloutBatch, valid: torch.Tensor, group_size: int) -> torch.Tensor:
        """``[N, C]`` advantages for the batch the last call scored."""
        if len(self._last) != batch.num_sequences:
            raise ValueError(f"scored {len(self._last)} completions, the batch has {batch.num_sequences}")
        width = batch.completion_mask.shape[1]
        ids = batch.input_ids[:, batch.prompt_width :]
        token_steps = []
        for i, text in enumerate(batch.completions):
            count = int(batch.completion_mask[i].sum())
            pieces = [self.tokenizer.decode([t]) for t in ids[i, :count].tolist()]
            ends = step_ends(text, self.delimiter)[1:]
            token_steps.append(token_step_index(pieces, ends))
        return process_advantages(self._last, token_steps, group_size, width, valid)
