"""Process rewards: a score per reasoning step, from rule checkers or from a learned model.

**Step checkers** (:class:`StepCheckerReward`): each step is scored by a weighted mean of checkers
(default ``0.3·syntax + 0.5·coherence + 0.2·fact``, weights configurable, any
:class:`~fastpeft.reasoning.types.Scorer` can be plugged in), combined by
:class:`~fastpeft.reasoning.verifiers.VerifierStack` (``weighted_mean``; a failing checker is left
out and reported). Defaults for the bundled arithmetic task reuse the reasoning verifiers:

- syntax: every equation in the step parses (``FormulaVerifier(check_values=False)``);
- coherence: the step's bookkeeping agrees with its own sum (``7+8=15 write 5 carry 1``);
- fact: every equation between numbers is true (``FormulaVerifier(check_values=True)``).

The completion's reward reduces the step scores (``mean``, ``min``, ``last``, ``product``).

**Learned** (:class:`ProcessRewardModel`): a LoRA adapter + scalar head
(:class:`~fastpeft.training.reward_model.ScalarHeadModel`) that scores the token closing each step,
trained with binary cross-entropy on step labels (:func:`train_process_reward_model`, a small
in-process loop over steps-and-labels records). The reward recipe trains the same kind of model on
automatic step labels at scale (``objective="process"``, :mod:`fastpeft.training.step_reward_model`,
labels from :mod:`fastpeft.training.step_labels`); as a GRPO reward its step scores give per-token
advantages (:mod:`fastpeft.training.process_supervision`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fastpeft.reasoning.verifiers import FormulaVerifier, VerifierStack

DEFAULT_WEIGHTS = {"syntax": 0.3, "coherence": 0.5, "fact": 0.2}
_REDUCE: dict[str, Callable[[list[float]], float]] = {
    "mean": lambda xs: sum(xs) / len(xs),
    "min": min,
    "last": lambda xs: xs[-1],
    "product": math.prod,
}
_COLUMN = re.compile(r"=\s*(\d+)(?:\s+write\s+(\d+)\s+carry\s+(\d+))?")


def split_steps(completion: str, delimiter: str = ";") -> list[str]:
    """The non-empty steps of ``completion`` separated by ``delimiter`` (whitespace stripped)."""
    if not delimiter:
        raise ValueError("step delimiter must be non-empty")
    return [s.strip() for s in completion.split(delimiter) if s.strip()]


class ColumnStepCoherence:
    """Scorer: 1.0 when a column step's ``write d carry c`` agrees with its sum ``s``
    (``d = s mod 10``, ``c = s div 10``) and a sum >= 10 is not written without its carry; steps
    without a column sum score 1.0 (nothing to contradict)."""

    def score(self, prompt: str, response: str) -> float:
        m = _COLUMN.search(response)
        if m is None or "borrow" in response or "-" in response.split("=")[0]:
            return 1.0
        total = int(m.group(1))
        if m.group(2) is None:
            return 1.0 if total < 10 else 0.0
        return 1.0 if (int(m.group(2)), int(m.group(3))) == (total % 10, total // 10) else 0.0


def arithmetic_step_checkers() -> dict[str, Any]:
    return {
        "syntax": FormulaVerifier(check_values=False),
        "coherence": ColumnStepCoherence(),
        "fact": FormulaVerifier(check_values=True),
    }


class StepCheckerReward:
    """Reward function ``(prompt, completion, record) -> float`` from per-step checker scores."""

    def __init__(
        self,
        checkers: Mapping[str, Any] | None = None,
        weights: Mapping[str, float] | None = None,
        delimiter: str = ";",
        reduce: str = "mean",
    ):
        checkers = dict(checkers) if checkers is not None else arithmetic_step_checkers()
        weights = dict(weights) if weights is not None else {k: DEFAULT_WEIGHTS.get(k, 1.0) for k in checkers}
        if reduce not in _REDUCE:
            raise ValueError(f"reduce must be one of {sorted(_REDUCE)}, got {reduce!r}")
        self.stack = VerifierStack(checkers, weights=weights, combine="weighted_mean")
        self.delimiter, self.reduce = delimiter, reduce
        self.__name__ = "process"

    def step_scores(self, prompt: str, completion: str) -> list[float]:
        """One score in [0, 1] per step."""
        return [self.stack.score(prompt, step) for step in split_steps(completion, self.delimiter)]

    def __call__(self, prompt: str, completion: str, record: Mapping[str, Any] | None = None) -> float:
        scores = self.step_scores(prompt, completion)
        return _REDUCE[self.reduce](scores) if scores else 0.0

    def step_labels(self, prompt: str, completion: str, threshold: float = 1.0) -> list[int]:
        """Automatic 0/1 labels (score >= ``threshold``), e.g. to train a :class:`ProcessRewardModel`."""
        return [int(s >= threshold) for s in self.step_scores(prompt, completion)]


class ProcessRewardModel:
    """A learned process reward model: ``score_model`` (a ScalarHeadModel) read at step ends.

    ``step_scores(prompt, completion)``: σ(score) at the last token of each step;
    ``score(prompt, response)``: σ(score) at the last token, so it also serves as a prefix scorer
    for :class:`~fastpeft.reasoning.verifiers.LearnedVerifier` in ``process`` mode.
    """

    def __init__(self, score_model: torch.nn.Module, tokenizer: Any, delimiter: str = ";", max_seq_len: int = 512):
        self.model, self.tokenizer, self.delimiter, self.max_seq_len = score_model, tokenizer, delimiter, max_seq_len

    def encode(self, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """Token ids of ``prompt + " " + "; ".join(steps)`` and the index of each step's last token."""
        text, ends = prompt, []
        for i, step in enumerate(steps):
            text += (" " if i == 0 else f"{self.delimiter} ") + step
            ends.append(len(text))
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        positions = []
        for end in ends:
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end]
            positions.append(inside[-1] if inside else 0)
        if len(ids) > self.max_seq_len:
            raise ValueError(f"prompt + steps are {len(ids)} tokens, more than max_seq_len={self.max_seq_len}")
        return ids, positions

    def _logits(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        x = torch.tensor([ids], device=device)
        return self.model(x, torch.ones_like(x))[0, positions]

    @torch.no_grad()
    def step_scores(self, prompt: str, completion: str) -> list[float]:
        steps = split_steps(completion, self.delimiter)
        if not steps:
            return []
        return torch.sigmoid(self._logits(*self.encode(prompt, steps))).tolist()

    @torch.no_grad()
    def score(self, prompt: str, response: str) -> float:
        ids = self.tokenizer(prompt + response)["input_ids"]
        return float(torch.sigmoid(self._logits(ids, [len(ids) - 1])[0]))


def train_process_reward_model(
    prm: ProcessRewardModel,
    records: Sequence[Mapping[str, Any]],
    steps: int = 50,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
) -> list[float]:
    """Fit ``prm.model``'s trainable parameters (adapter + head) on step labels.

    ``records``: ``{"prompt": str, "steps": [str, ...], "labels": [0/1, ...]}``. Loss: mean binary
    cross-entropy of the step-end scores against the labels. Returns the loss of every step.
    """
    encoded = []
    for i, r in enumerate(records):
        if len(r.get("steps", ())) != len(r.get("labels", ())) or not r.get("steps"):
            raise ValueError(f"record {i}: 'steps' and 'labels' must be non-empty lists of the same length")
        ids, pos = prm.encode(r["prompt"], r["steps"])
        encoded.append((ids, pos, [float(x) for x in r["labels"]]))
    params = [p for p in prm.model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the process reward model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr)
    device = next(prm.model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    losses = []
    prm.model.train()
    for _ in range(steps):
        idx = torch.randperm(len(encoded), generator=gen)[:batch_size].tolist()
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), width), prm.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
            mask[row, : len(encoded[i][0])] = 1
        scores = prm.model(ids.to(device), mask.to(device))  # [b, T]
        logits = torch.cat([scores[row, encoded[i][1]] for row, i in enumerate(idx)])
        labels = torch.tensor([y for i in idx for y in encoded[i][2]], device=device)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    prm.model.eval()
    return losses
