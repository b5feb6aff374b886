"""The SFT loss: token-level cross-entropy of a causal LM, with the LM head fused into the loss.

    loss_sum = Σ_{b,t : y[b,t+1] ≠ -100}  −log softmax(h[b,t] · Wᵀ)[y[b,t+1]]

The recipe divides ``loss_sum`` by the number of target tokens in the whole optimizer step (all
micro-batches, all ranks), so gradient accumulation and DDP give the same update as one big batch.

``loss_impl`` picks how ``h · Wᵀ`` and the cross-entropy are computed:

- ``"fastpeft"``: :func:`fastpeft.kernels.linear_cross_entropy.linear_cross_entropy` (chunked on
  CPU, Triton row kernel on GPU), never holding the full ``[B, T, V]`` fp32 logits;
- ``"liger"``: Liger-Kernel's fused linear cross-entropy (optional dependency, CUDA);
- ``"full"``: the model's own LM head and ``F.cross_entropy`` over full logits (needed for heads
  that scale or soft-cap logits, e.g. Gemma 2);
- ``"auto"``: liger when it is installed and the model is on CUDA, else fastpeft.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from fastpeft.kernels.linear_cross_entropy import linear_cross_entropy
from fastpeft.training.data import IGNORE_INDEX

LOSS_IMPLS = ("auto", "fastpeft", "liger", "full")


def resolve_loss_impl(loss_impl: str, device: torch.device) -> str:
    """The concrete implementation for ``loss_impl`` on ``device`` (ValueError if unavailable)."""
    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    if loss_impl == "auto":
        return "liger" if has_liger and device.type == "cuda" else "fastpeft"
    if loss_impl == "liger" and not (has_liger and device.type == "cuda"):
        raise ValueError("loss_impl='liger' needs the liger-kernel package and a CUDA device")
    return loss_impl


def attention_inputs(
    segment_ids: torch.Tensor, position_ids: torch.Tensor, packed: bool, attn_implementation: str
) -> dict[str, torch.Tensor]:
    """Model kwargs that keep attention inside each example.

    Unpacked rows: a 2-D padding mask. Packed rows: flash-attention implementations get only the
    restarting ``position_ids`` (transformers turns them into varlen boundaries); sdpa/eager get a
    4-D block-diagonal causal mask ``[B, 1, T, T]`` (bool for sdpa, additive fp32 for eager, whose
    kernel adds the mask to the scores). Padding tokens (segment 0) attend to each other only, so
    no row of the mask is empty and nothing turns into NaN.
    """
    if not packed:
        return {"attention_mask": (segment_ids > 0).long(), "position_ids": position_ids}
    if attn_implementation.startswith("flash") or "flash_attention" in attn_implementation:
        return {"position_ids": position_ids}
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal  # [B, T, T]
    mask = allowed[:, None]
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        mask = torch.where(mask, zero, torch.finfo(torch.float32).min)
    elif attn_implementation not in ("sdpa", "flex_attention"):
        raise ValueError(
            f"packing with attn_implementation={attn_implementation!r} is not supported; "
            "use sdpa, eager or a flash-attention implementation"
        )
    return {"attention_mask": mask, "position_ids": position_ids}


def _liger_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(weight, hidden, labels)
    return out[0] if isinstance(out, tuple) else out


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so ``forward`` returns ``(loss_sum, n_targets)`` for one micro-batch.

    Wrapping (rather than calling submodules from the trainer) lets DDP see a single forward.
    Inputs are :func:`fastpeft.training.data.collate`'s tensors ``[B, T]``.
    """

    def __init__(self, model: nn.Module, loss_impl: str = "auto", chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        device = next(model.parameters()).device
        self.loss_impl = resolve_loss_impl(loss_impl, device)
        head = model.get_output_embeddings()
        cfg = model.config
        if self.loss_impl != "full":
            if not isinstance(head, nn.Linear) or head.bias is not None:
                raise ValueError(
                    f"the fused loss needs a plain bias-free nn.Linear LM head, got {type(head).__name__}; "
                    "use loss_impl='full'"
                )
            for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
                if getattr(cfg, attr, None) not in (None, 1.0):
                    raise ValueError(
                        f"the model's config sets {attr}; the fused loss does not apply it, use loss_impl='full'"
                    )

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        packed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        impl = self.model.config._attn_implementation or "eager"
        kwargs: dict[str, Any] = attention_inputs(segment_ids, position_ids, packed, impl)
        targets = labels[:, 1:]
        n_targets = (targets != IGNORE_INDEX).sum()
        if self.loss_impl == "full":
            logits = self.model(input_ids=input_ids, use_cache=False, **kwargs).logits[:, :-1]
            loss = nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            return loss, n_targets
        out = self.model.base_model(input_ids=input_ids, use_cache=False, **kwargs)
        hidden = out[0][:, :-1]
        weight = self.model.get_output_embeddings().weight
        if self.loss_impl == "liger":
            h = hidden.reshape(-1, hidden.shape[-1])
            return _liger_loss_sum(h.to(weight.dtype), weight, targets.reshape(-1)), n_targets
        loss = linear_cross_entropy(
            hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum", chunk_size=self.chunk_size
        )
        return loss, n_targets
