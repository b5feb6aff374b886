"""Per-token log-probs of a causal LM without its ``[B, T, V]`` logits.

The backbone (``lm.base_model``) gives hidden states ``[B, T, H]``; only the positions that predict a
wanted token are gathered (completion tokens, DPO's target tokens), and they go through
:func:`fastpeft.kernels.linear_logprobs.linear_logprobs` with the LM head's weight: log p(token)
and the entropy of the next-token distribution per position, over row chunks with the op's own
backward. The policy, the reference (same weights, adapters disabled) and the PPO value pass all
come through here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from fastpeft.kernels.linear_logprobs import linear_logprobs
from fastpeft.training.data import IGNORE_INDEX

_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def check_plain_lm_head(lm: nn.Module) -> nn.Linear:
    """The LM head, refusing heads that are more than ``h · Wᵀ`` (a bias, an adapter on it, or a
    config that scales or soft-caps the logits)."""
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (LM head)")
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(
            f"per-token log-probs take the LM head as a bias-free nn.Linear, got {type(head).__name__}"
            f"{' with a bias' if isinstance(head, nn.Linear) else ''} (leave lm_head out of the adapter's "
            "target_modules)"
        )
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for attr in _SCALED_LOGITS:
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise ValueError(f"the model's config sets {attr}; per-token log-probs here use the plain LM head")
    return head


def backbone_hidden(
    lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` of the LM's backbone (``lm.base_model``), no LM head."""
    out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out[0]


def predicting_rows(keep: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Flat indices, into a ``[B, T]`` grid, of the positions ``first .. T - 2`` that predict a kept
    token: ``keep`` ``[B, T - 1 - first]`` bool marks which of them count. FakeTensors (memory
    accounting) have no values: there every position of the region counts, the most it can take."""
    b, width = keep.shape
    t = width + first + 1
    region = torch.arange(b * t, device=keep.device).view(b, t)[:, first : t - 1].reshape(-1)
    return region if is_fake(keep) else region[keep.reshape(-1)]


def head_logprobs(
    lm: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target), entropy)`` of ``softmax(h · Wᵀ / τ)``: hidden ``[*, H]``, targets ``[*]`` -> two
    fp32 tensors shaped like ``targets`` (chunked; no ``[*, V]`` tensor is ever held)."""
    return linear_logprobs(hidden, check_plain_lm_head(lm).weight, targets, temperature)


def scatter_rows(values: torch.Tensor, rows: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """``values`` ``[K]`` at flat positions ``rows`` of a zero tensor of ``shape`` (differentiable)."""
    out = values.new_zeros(int(torch.Size(shape).numel()))
    return out.index_copy(0, rows, values).view(shape)


def completion_logprobs(
    lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prompt_width: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the completion tokens (columns ``prompt_width ..``) of rollout rows
    ``[B, Lp + C]``: ``(logp [B, C], entropy [B, C], hidden [B, C, H])``, 0 at padding (which costs
    no LM-head work). ``hidden`` are the states before each completion token (a value head's input)."""
    lp = prompt_width
    if not 1 <= lp < input_ids.shape[1]:
        raise ValueError(f"prompt_width must be in [1, {input_ids.shape[1]}), got {lp}")
    full = backbone_hidden(lm, input_ids, attention_mask, position_ids)  # [B, T, H]
    rows = predicting_rows(attention_mask[:, lp:] > 0, first=lp - 1)
    logp, ent = head_logprobs(
        lm,
        full.reshape(-1, full.shape[-1]).index_select(0, rows),
        input_ids.reshape(-1).index_select(0, rows + 1),
        temperature,
    )
    cols = slice(lp - 1, -1)
    return (
        scatter_rows(logp, rows, input_ids.shape)[:, cols],
        scatter_rows(ent, rows, input_ids.shape)[:, cols],
        full[:, cols],
    )


def sequence_logprobs(
    lm: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    average: bool = False,
) -> torch.Tensor:
    """Sum (or, with ``average``, mean) of the target tokens' log-probs per row of an SFT-collated
    batch (``labels`` ``[B, T]``, -100 = not a target): ``[B]`` fp32. DPO's sequence log-probs."""
    hidden = backbone_hidden(lm, input_ids, attention_mask, position_ids)  # [B, T, H]
    is_target = labels[:, 1:] != IGNORE_INDEX
    rows = predicting_rows(is_target)  # position t predicts token t + 1
    targets = labels.reshape(-1).index_select(0, rows + 1)
    if is_fake(targets):
        targets = targets.clamp(min=0)  # (no values to check: any id is as good as another)
    logp, _ = head_logprobs(lm, hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), targets)
    total = logp.new_zeros(labels.shape[0]).index_add(0, torch.div(rows, labels.shape[1], rounding_mode="floor"), logp)
    return total / is_target.sum(-1).clamp(min=1) if average else total
