"""Rollouts for GRPO and PPO: sample G completions per prompt, score them, lay them out as tensors.

Sampling goes through any :class:`fastpeft.reasoning.types.Generator`; the default is the batched
KV-cache :class:`fastpeft.reasoning.sampler.Sampler` on the policy itself (adapters active). When
the generator has ``generate_ids`` the prompts are tokenized here and handed over as ids, so the
tokens trained on are exactly the tokens sampled.

Layout of a batch of ``N = P·G`` sequences (row ``p·G + j`` is sample j of prompt p)::

    input_ids [N, Lp + C] = [ left-padded prompt (width Lp) | right-padded completion (width C) ]

so every completion starts at column ``Lp`` and per-token tensors over the completion are
``[N, C]``: the log-prob of completion token t comes from the hidden state at column ``Lp - 1 + t``.
Positions are ``cumsum(attention_mask) - 1`` (as the sampler uses). ``completion_mask`` is 1 on
generated tokens (an EOS included, padding excluded); ``truncated`` marks completions cut by the
length budget (``finish_reason == "length"``), which ``mask_truncated`` removes from the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastpeft.reasoning.types import Completion, Generator, SamplingParams
from fastpeft.training.logprobs import completion_logprobs


@dataclasses.dataclass
class RolloutBatch:
    """``N`` sampled sequences and their tensors (see the module docstring for the layout)."""

    prompts: list[str]  # [N] (each prompt repeated G times)
    records: list[Mapping[str, Any]]  # [N]
    completions: list[str]  # [N] decoded completion text
    input_ids: torch.Tensor  # [N, Lp + C]
    attention_mask: torch.Tensor  # [N, Lp + C]
    position_ids: torch.Tensor  # [N, Lp + C]
    completion_mask: torch.Tensor  # [N, C] float
    truncated: torch.Tensor  # [N] bool
    prompt_width: int  # Lp
    group_size: int  # G

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> RolloutBatch:
        tensors = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **tensors)

    def rows(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """The model inputs of a subset of rows."""
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "position_ids": self.position_ids[index],
        }


def _encode(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


def layout(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    min_completion_width: int = 1,
) -> tuple[torch.Tensor, ...]:
    """Left-pad prompts, right-pad completions: ``(input_ids, attention_mask, position_ids,
    completion_mask, prompt_width)`` (see the module docstring)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    lp = max(len(p) for p in prompt_ids)
    c = max(min_completion_width, max(len(x) for x in completion_ids))
    n = len(prompt_ids)
    ids = torch.full((n, lp + c), pad_id, dtype=torch.long)
    mask = torch.zeros((n, lp + c), dtype=torch.long)
    for i, (p, x) in enumerate(zip(prompt_ids, completion_ids)):
        if not p:
            raise ValueError(f"prompt {i} has no tokens")
        ids[i, lp - len(p) : lp] = torch.tensor(p, dtype=torch.long)
        mask[i, lp - len(p) : lp] = 1
        if x:
            ids[i, lp : lp + len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, lp : lp + len(x)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, mask[:, lp:].float(), lp


def generate_rollouts(
    generator: Generator,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    group_size: int,
    params: SamplingParams,
    prompt_key: str = "prompt",
) -> RolloutBatch:
    """``group_size`` completions of each record's prompt, laid out as a :class:`RolloutBatch`."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    prompts = []
    for i, r in enumerate(records):
        if prompt_key not in r:
            raise KeyError(f"record {i} has no {prompt_key!r} (keys: {sorted(r)})")
        prompts.append(str(r[prompt_key]))
    prompt_ids = [_encode(tokenizer, p) for p in prompts]
    if hasattr(generator, "generate_ids"):
        groups: list[list[Completion]] = generator.generate_ids(prompt_ids, params, group_size)
    else:
        groups = generator.generate(prompts, params, group_size)
    if len(groups) != len(prompts) or any(len(g) != group_size for g in groups):
        raise ValueError(
            f"the generator returned {[len(g) for g in groups]} completions for {len(prompts)} prompts x {group_size}"
        )
    flat = [c for g in groups for c in g]
    texts = [
        c.text if c.text or not c.token_ids else tokenizer.decode(_strip_eos(c), skip_special_tokens=True) for c in flat
    ]
    rep_prompt_ids = [p for p in prompt_ids for _ in range(group_size)]
    ids, mask, positions, comp_mask, lp = layout(
        rep_prompt_ids, [c.token_ids for c in flat], tokenizer.pad_token_id or 0
    )
    truncated = torch.tensor([c.finish_reason == "length" for c in flat], dtype=torch.bool)
    return RolloutBatch(
        [p for p in prompts for _ in range(group_size)],
        [r for r in records for _ in range(group_size)],
        texts,
        ids,
        mask,
        positions,
        comp_mask,
        truncated,
        lp,
        group_size,
    )


def _strip_eos(c: Completion) -> list[int]:
    return c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids


class CompletionLogprobs(nn.Module):
    """``forward(input_ids, attention_mask, position_ids) -> {"logp", "entropy"[, "values"]}``, each
    ``[B, C]``: log-probs of the completion tokens (columns ``prompt_width ..``) at sampling
    temperature ``temperature`` and the entropies of those next-token distributions, through the
    chunked LM head (:func:`~fastpeft.training.logprobs.completion_logprobs`: no ``[B, C, V]``); with
    ``value_head``, the values of the states before each token (PPO). One module, so DDP sees one forward."""

    def __init__(
        self, lm: nn.Module, prompt_width: int = 1, temperature: float = 1.0, value_head: nn.Module | None = None
    ):
        super().__init__()
        self.lm, self.prompt_width, self.temperature, self.value_head = lm, prompt_width, temperature, value_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        logp, entropy, hidden = completion_logprobs(
            self.lm, input_ids, attention_mask, position_ids, self.prompt_width, self.temperature
        )
        out = {"logp": logp, "entropy": entropy}
        if self.value_head is not None:
            with torch.autocast(hidden.device.type, enabled=False):  # the fp32 head stays fp32 under autocast
                out["values"] = self.value_head(hidden.float()).squeeze(-1)
        return out


@torch.no_grad()
def batched_logprobs(module: nn.Module, batch: RolloutBatch, micro_batch_size: int) -> dict[str, torch.Tensor]:
    """:class:`CompletionLogprobs` outputs for every row (no grad), ``micro_batch_size`` rows per
    forward, concatenated: each ``[N, C]``."""
    outs = [
        module(**batch.rows(slice(i, i + micro_batch_size))) for i in range(0, batch.num_sequences, micro_batch_size)
    ]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
