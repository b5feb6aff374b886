"""Evaluation: mean loss per target token, and exact-match accuracy by greedy generation.

Exact match applies where records carry an ``"answer"``: the model continues each prompt greedily
(transformers' ``generate``, batched with left padding) and the continuation is judged by
``match``: ``"answer"`` compares the stated final answer (``answer 85``, the bundled arithmetic
task's format, or ``#### 85``, ``\\boxed{85}``: :func:`fastpeft.reasoning.answers.is_correct`),
``"exact"`` compares the whole continuation after stripping whitespace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastpeft.reasoning.answers import is_correct
from fastpeft.training.data import Row, collate
from fastpeft.training.losses import CausalLMLoss

MATCH_MODES = ("answer", "exact")


@torch.no_grad()
def evaluate_loss(
    loss_module: CausalLMLoss,
    rows: Sequence[Row],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    packed: bool,
    autocast_dtype: torch.dtype | None,
) -> float:
    """Mean cross-entropy per target token over ``rows`` (model put in eval mode, then restored)."""
    was_training = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss, n = loss_module(
                    batch["input_ids"], batch["labels"], batch["position_ids"], batch["segment_ids"], packed=packed
                )
            total += float(loss)
            count += int(n)
    finally:
        loss_module.train(was_training)
    return total / max(count, 1)


def _prompt_text(record: dict[str, Any], tokenizer: Any, use_chat_template: bool) -> str:
    if "messages" in record:
        msgs = list(record["messages"])
        if msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if use_chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"]}], tokenize=False, add_generation_prompt=True
        )
    return record["prompt"]


def judge(text: str, answer: str, match: str) -> bool:
    """Is the generated ``text`` right, by ``match`` mode (see the module docstring)?"""
    if match == "answer":
        return is_correct(text, answer)
    if match == "exact":
        return " ".join(text.split()) == " ".join(str(answer).split())
    raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")


@torch.no_grad()
def greedy_completions(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int, device: torch.device
) -> list[str]:
    """Greedy continuations of ``prompts`` (text after the prompt, special tokens removed)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    outputs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    match: str = "answer",
    max_new_tokens: int = 64,
    batch_size: int = 64,
    device: torch.device | None = None,
    use_chat_template: bool = False,
) -> dict[str, Any]:
    """Accuracy of greedy answers on records with an ``"answer"``: ``{"exact_match", "n", "samples"}``
    (``samples``: the first three (prompt, output) pairs, for eyeballing)."""
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
    records = [r for r in records if "answer" in r]
    if not records:
        return {"exact_match": None, "n": 0, "samples": []}
    device = device or next(model.parameters()).device
    prompts = [_prompt_text(r, tokenizer, use_chat_template) for r in records]
    texts = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size, device)
    correct = sum(judge(t, r["answer"], match) for t, r in zip(texts, records))
    return {"exact_match": correct / len(records), "n": len(records), "samples": list(zip(prompts, texts))[:3]}
