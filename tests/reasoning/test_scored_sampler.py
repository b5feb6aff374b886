"""ScoredSampler: policy rows and verifier rows in one routed forward per token; the completions are
the policy's, the scores equal a separate verifier pass over the same texts."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.reasoning.sampler import Sampler
from fastpeft.reasoning.scored_sampler import ScoredSampler
from fastpeft.reasoning.search import search
from fastpeft.reasoning.types import SamplingParams
from fastpeft.training.model_setup import build_model

PROMPTS = ["Q: 12+7=?\nA:", "Q: 3+4=?\nA:"]


@pytest.fixture(scope="module")
def two_adapters(tiny_llama, char_tokenizer):
    torch.manual_seed(0)
    model = build_model(None, tiny_llama(max_position_embeddings=64), seed=0)
    for name in ("verifier", "policy"):  # policy last: it is the active one
        fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name=name)
        for n, p in model.named_parameters():
            if f".{name}." in n and "lora_B" in n:
                p.data.normal_(0, 0.3)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    return model.eval(), head, char_tokenizer


def separate_score(model, head, tok, text, ids=None):
    """The verifier's score at the last token of ``text`` (or of the token ids ``ids``), in its own pass."""
    ids = torch.tensor([tok.encode(text) if ids is None else ids])
    with torch.no_grad(), fastpeft.route_adapters(model, ["verifier"]):
        h = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))[0][0, -1]
        return float(torch.sigmoid(head(h)))


def test_greedy_completions_match_the_sampler_and_scores_a_separate_pass(two_adapters):
    model, head, tok = two_adapters
    scored = ScoredSampler(model, tok, head, verifier="verifier")
    assert scored.policy == "policy"
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop=("; ",))
    got = scored.generate(PROMPTS, params, n=2)
    want = Sampler(model, tok).generate(PROMPTS, params, n=2)
    assert [[c.text for c in row] for row in got] == [[c.text for c in row] for row in want]
    assert [[c.finish_reason for c in row] for row in got] == [[c.finish_reason for c in row] for row in want]
    for prompt, row in zip(PROMPTS, got):
        for c in row:
            assert scored.score(prompt, c.text) == pytest.approx(
                separate_score(model, head, tok, prompt + c.text), abs=1e-5
            )


def test_sampled_rows_are_seeded_and_every_text_is_scored(two_adapters):
    model, head, tok = two_adapters
    scored = ScoredSampler(model, tok, head, verifier="verifier")
    params = SamplingParams(max_new_tokens=9, temperature=1.0, seed=3)
    first = scored.generate(PROMPTS, params, n=3)
    again = ScoredSampler(model, tok, head, verifier="verifier").generate(PROMPTS, params, n=3)
    assert [[c.token_ids for c in r] for r in first] == [[c.token_ids for c in r] for r in again]
    for prompt, row in zip(PROMPTS, first):
        for c in row:
            assert 0 < c.num_tokens <= 9
            # a random model samples special tokens whose text does not re-tokenize the same: compare on ids
            ids = tok.encode(prompt) + (c.token_ids[:-1] if c.finish_reason == "eos" else c.token_ids)
            assert scored.score(prompt, c.text) == pytest.approx(separate_score(model, head, tok, "", ids), abs=1e-5)


def test_beam_search_needs_no_scoring_pass(two_adapters):
    model, head, tok = two_adapters
    calls = []
    fallback = type("Counting", (), {"score": lambda self, p, r: calls.append(r) or 0.5})()
    scored = ScoredSampler(model, tok, head, verifier="verifier", fallback=fallback)
    result = search(
        scored,
        PROMPTS[0],
        "beam_search",
        budget=96,
        scorer=scored,
        n=4,
        beam_width=2,
        stop="; ",
        max_new_tokens=6,
        seed=1,
    )
    assert result.tokens_spent <= 96 and calls == [] and scored.misses == 0


def test_misuse_is_refused(two_adapters):
    model, head, tok = two_adapters
    scored = ScoredSampler(model, tok, head, verifier="verifier")
    with pytest.raises(KeyError, match="did not generate"):
        scored.score("Q", "never sampled")
    with pytest.raises(ValueError, match="policy adapter 'policy' only"):
        scored.generate(PROMPTS, SamplingParams(max_new_tokens=2), adapters="verifier")
    with pytest.raises(ValueError, match="no adapter named 'critic'"):
        ScoredSampler(model, tok, head, verifier="critic")
