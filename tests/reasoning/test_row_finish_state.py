"""RowFinishState (the sampler's device-side bookkeeping) gives exactly what a per-token host check
gives, whatever the check interval; and the sampler's decode loop does not sync per token."""

from __future__ import annotations

import random

import pytest
import torch

from fastpeft.reasoning import sampler as sampler_module
from fastpeft.reasoning.decoding import RowFinishState, StopStringChecker

EOS = 0
VOCAB = "_abcxyz;"  # token t decodes to VOCAB[t]; token 0 is EOS


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[t] for t in ids)


def per_token_reference(streams, budgets, stops, ignore_eos):
    """The old host loop: after every token, EOS, then a stop string, then the budget."""
    checker = StopStringChecker(stops, decode) if stops else None
    out = []
    for stream, budget in zip(streams, budgets):
        kept: list[int] = []
        reason = None
        for tok in stream:
            kept.append(tok)
            if not ignore_eos and tok == EOS:
                reason = "eos"
            elif checker is not None and checker.check(kept) is not None:
                reason = "stop"
            elif len(kept) >= budget:
                reason = "length"
            if reason:
                break
        out.append((kept, reason))
    return out


@pytest.mark.parametrize("every", [1, 3, 8, 100])
@pytest.mark.parametrize("stops", [(), (";",), ("xy", "zz;")])
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_batched_checks_equal_per_token_checks(every, stops, ignore_eos):
    rng = random.Random(hash((every, stops, ignore_eos)) & 0xFFFF)
    rows, steps = 9, 30
    budgets = [rng.randint(1, steps) for _ in range(rows)]
    budgets[0] = steps
    streams = [
        [rng.choice(range(len(VOCAB))) if rng.random() < 0.9 else EOS for _ in range(steps)] for _ in range(rows)
    ]
    state = RowFinishState(budgets, () if ignore_eos else (EOS,), torch.device("cpu"))
    checker = StopStringChecker(stops, decode) if stops else None
    gen_len = max(budgets)
    for step in range(gen_len):
        tokens = torch.tensor([s[step] for s in streams])
        state.record(step, tokens, -torch.arange(rows, dtype=torch.float32) - step)
        if step == gen_len - 1 or step % every == every - 1:
            if checker is not None:
                state.check_stops(step + 1, checker)
            if state.all_finished():
                break
    got = state.results()
    want = per_token_reference(streams, budgets, stops, ignore_eos)
    for r, ((ids, logprobs, reason), (want_ids, want_reason)) in enumerate(zip(got, want)):
        assert (ids, reason) == (want_ids, want_reason), r
        assert logprobs == [float(-r - p) for p in range(len(ids))]


def test_decode_loop_syncs_every_few_steps_not_every_token(monkeypatch):
    """Count the host transfers of the decode loop (.tolist / .item / bool on tensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpeft.reasoning.types import SamplingParams

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    sampler = sampler_module.Sampler(model)
    new_tokens = 40
    calls = {"n": 0}
    for name in ("tolist", "item", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    sampler.generate_ids([[3, 4, 5]] * 2, SamplingParams(max_new_tokens=new_tokens, seed=0), n=3, ignore_eos=True)
    assert calls["n"] <= 12 + new_tokens // sampler_module.SYNC_EVERY, calls  # was >= 2 per token


def test_sample_rows_draws_the_distribution_and_never_a_zero_entry():
    from fastpeft.reasoning.decoding import sample_rows

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_rows(probs, gen) for _ in range(20000)])  # [20000, 3]
    for r in range(3):
        freq = torch.bincount(draws[:, r], minlength=4).float() / len(draws)
        assert (freq - probs[r]).abs().max() < 0.015, (r, freq)
        assert (freq[probs[r] == 0] == 0).all()
    again = torch.stack([sample_rows(probs, torch.Generator().manual_seed(0)) for _ in range(3)])
    assert torch.equal(again[0], draws[0])  # seeded: reproducible
