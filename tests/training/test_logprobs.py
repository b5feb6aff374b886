"""Per-token log-probs through the chunked LM head equal the model's own full logits, for
rollout completions (with entropies and padding) and for DPO's sequence sums, to fp32 rounding (the
LoRA layers take fp32/bf16/fp16; the op itself is checked in float64 in tests/kernels); heads that
are more than a matmul are refused."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.training.data import collate, tokenize_records, unpacked_rows
from fastpeft.training.logprobs import check_plain_lm_head, completion_logprobs, sequence_logprobs
from fastpeft.training.model_setup import build_model
from fastpeft.training.rollout import layout


def _model(tiny_llama):
    model = build_model(None, tiny_llama(), seed=3)
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # make the adapters matter
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_completion_logprobs_equal_full_logits(tiny_llama, temperature):
    model = _model(tiny_llama)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (n,), generator=gen).tolist() for n in (5, 2, 7)]
    completions = [torch.randint(3, 100, (n,), generator=gen).tolist() for n in (4, 1, 6)]
    ids, mask, pos, comp_mask, lp = layout(prompts, completions, pad_id=0)
    logp, ent, hidden = completion_logprobs(model, ids, mask, pos, lp, temperature)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, lp - 1 : -1] / temperature
    full = torch.log_softmax(logits, -1)
    want_logp = full.gather(-1, ids[:, lp:, None]).squeeze(-1) * comp_mask
    want_ent = -(full.exp() * full).sum(-1) * comp_mask
    torch.testing.assert_close(logp, want_logp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ent, want_ent, atol=2e-5, rtol=2e-5)
    assert hidden.shape == (*ids[:, lp:].shape, model.config.hidden_size)
    # gradients reach the adapters the same way
    (logp * comp_mask).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    want_logp.sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, atol=2e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_equal_full_logits(tiny_llama, char_tokenizer, arithmetic_records, average):
    model = _model(tiny_llama)
    b = collate(
        unpacked_rows(tokenize_records(arithmetic_records[:3], char_tokenizer, 64)), char_tokenizer.pad_token_id
    )
    attention = (b["segment_ids"] > 0).long()
    got = sequence_logprobs(model, b["input_ids"], b["labels"], attention, b["position_ids"], average)
    logits = model(input_ids=b["input_ids"], attention_mask=attention, position_ids=b["position_ids"]).logits[:, :-1]
    targets = b["labels"][:, 1:]
    keep = targets != -100
    token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * keep
    want = token.sum(-1) / (keep.sum(-1) if average else 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=2e-5)


def test_heads_that_are_more_than_a_matmul_are_refused(tiny_llama):
    model = build_model(None, tiny_llama(), seed=0)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with pytest.raises(ValueError, match="bias"):
        check_plain_lm_head(model)
    model = build_model(None, tiny_llama(), seed=0)
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        check_plain_lm_head(model)
