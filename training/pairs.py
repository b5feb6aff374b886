"""Preference pairs for the reward-model and DPO recipes: ``{"prompt", "chosen", "rejected"[, "margin"]}``
records tokenized like SFT (completion-only labels, EOS appended) and collated two rows per pair."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from fastpeft.training.data import Row, collate, tokenize_record, unpacked_rows


@dataclasses.dataclass
class PairRow:
    """One tokenized preference pair (SFT rows: prompt tokens are labelled -100)."""

    index: int
    chosen: Row
    rejected: Row
    margin: float = 0.0


def tokenize_pairs(
    records: list[dict[str, Any]],
    tokenizer: Any,
    max_seq_len: int,
    use_chat_template: bool = False,
    margin_key: str = "margin",
) -> list[PairRow]:
    """``{"prompt", "chosen", "rejected"[, "margin"]}`` records -> :class:`PairRow` list, through the
    SFT tokenization (completion-only labels, EOS appended). Pairs where truncation leaves either
    side without a target token, or cuts off everything that told the two sides apart (they would
    add a constant loss and no gradient), are dropped with a warning."""
    pairs, dropped, same = [], 0, 0
    for i, rec in enumerate(records):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            raise ValueError(f"preference record {i} lacks {missing} (keys: {sorted(rec)})")
        sides = [
            tokenize_record(
                {"prompt": rec["prompt"], "completion": rec[k]},
                tokenizer,
                max_seq_len,
                use_chat_template=use_chat_template,
            )
            for k in ("chosen", "rejected")
        ]
        if any(s is None for s in sides):
            dropped += 1
            continue
        chosen, rejected = unpacked_rows(sides)
        if chosen.input_ids == rejected.input_ids:
            same += 1
            continue
        pairs.append(PairRow(i, chosen, rejected, float(rec.get(margin_key, 0.0))))
    if dropped:
        warnings.warn(f"dropped {dropped} pairs with no target tokens within max_seq_len={max_seq_len}", stacklevel=2)
    if same:
        warnings.warn(
            f"dropped {same} pairs whose chosen and rejected sides are the same tokens within "
            f"max_seq_len={max_seq_len}",
            stacklevel=2,
        )
    if not pairs:
        raise ValueError("no usable preference pairs")
    return pairs


def collate_pairs(pairs: list[PairRow], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch of ``2B`` rows: the B chosen rows, then the B rejected ones (SFT ``collate``)."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return {k: v.to(device) for k, v in batch.items()}
