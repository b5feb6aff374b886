"""Reward-hacking: a deliberately hackable proxy reward and an adversarial detector against it.

Safeguards available to the RL recipes (used together in ``tests/training/test_rewards_hacking.py``):

1. several objectives with weights (:class:`~fastpeft.training.rewards.MultiObjectiveReward`), so
   a proxy such as length is only part of the total;
2. the KL term to the adapter-disabled reference policy (GRPO ``beta``, PPO ``kl_coef``), which
   makes drifting far from the reference cost reward;
3. :class:`HackingDetector`: a classifier adapter (LoRA + scalar head on a causal LM) trained to
   tell gamed outputs from genuine ones; its probability of "gamed" is subtracted from the reward
   (``MultiObjectiveReward(..., detector=det, detector_weight=λ)``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def length_reward(prompt: str, completion: str, record: Mapping[str, Any] | None = None) -> float:
    """``len(completion) / 50``: longer looks "more thorough". A proxy that is trivially gamed by
    padding — the standard example of a hackable reward."""
    return len(completion) / 50.0


class HackingDetector:
    """``score(prompt, response)`` = P(gamed) from a scalar-head classifier (the ``Scorer`` protocol).

    ``score_model`` is a :class:`~fastpeft.training.reward_model.ScalarHeadModel` whose trainable
    parameters are an adapter and the head; :meth:`fit` trains them with binary cross-entropy
    (gamed = 1, genuine = 0) on the last token of ``prompt + response + EOS``. Scores are cached
    (RL batches repeat completions), and the cache is cleared by :meth:`fit`.
    """

    def __init__(self, score_model: torch.nn.Module, tokenizer: Any, max_seq_len: int = 512, cache_size: int = 8192):
        self.model, self.tokenizer, self.max_seq_len = score_model, tokenizer, max_seq_len
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._cache_size = cache_size

    def _encode(self, prompt: str, response: str) -> list[int]:
        ids = list(self.tokenizer(prompt + response)["input_ids"])[: self.max_seq_len - 1]
        return ids + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])

    def _batch(self, texts: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [self._encode(p, r) for p, r in texts]
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        device = next(self.model.parameters()).device
        return ids.to(device), mask.to(device)

    def logits(self, texts: Sequence[tuple[str, str]]) -> torch.Tensor:
        """Classifier logits ``[len(texts)]`` for (prompt, response) pairs."""
        ids, mask = self._batch(texts)
        return self.model.sequence_scores(ids, mask)

    @torch.no_grad()
    def score(self, prompt: str, response: str) -> float:
        key = (prompt, response)
        if key not in self._cache:
            was = self.model.training
            self.model.eval()
            try:
                self._cache[key] = float(torch.sigmoid(self.logits([key])[0]))
            finally:
                self.model.train(was)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return self._cache[key]

    def fit(
        self,
        genuine: Sequence[tuple[str, str]],
        gamed: Sequence[tuple[str, str]],
        steps: int = 50,
        lr: float = 1e-3,
        batch_size: int = 16,
        seed: int = 0,
    ) -> list[float]:
        """Train on (prompt, response) examples of each class; returns the loss of every step."""
        if not genuine or not gamed:
            raise ValueError("fit needs at least one genuine and one gamed example")
        data = [(t, 0.0) for t in genuine] + [(t, 1.0) for t in gamed]
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the detector has no trainable parameters (inject an adapter first)")
        optimizer = torch.optim.AdamW(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        self.model.train()
        for _ in range(steps):
            idx = torch.randperm(len(data), generator=gen)[:batch_size].tolist()
            logits = self.logits([data[i][0] for i in idx])
            labels = torch.tensor([data[i][1] for i in idx], device=logits.device)
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        self.model.eval()
        self._cache.clear()
        return losses
