"""The sampling-throughput measuring function behind ``fastpeft bench sampling``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastpeft.cli.bench import load_benchmarks
from fastpeft.reasoning.sampler import Sampler
from fastpeft.reasoning.types import SamplingParams

load_benchmarks()

from fastpeft_benchmarks import sampling_throughput  # noqa: E402

EOS = 2


def _llama_that_always_says_eos() -> torch.nn.Module:
    """A tiny Llama whose next token is EOS at every step, greedy or sampled (an LM head with a bias)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
        max_position_embeddings=32,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(config).eval()
    model.lm_head = torch.nn.Linear(32, 40, bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[EOS] = 100.0
    return model


def test_rows_run_past_eos_and_the_median_of_timed_calls_is_reported(monkeypatch):
    model = _llama_that_always_says_eos()
    stopped = Sampler(model).generate_ids([[5, 6, 7]], SamplingParams(max_new_tokens=4, temperature=1.0, seed=0), 2)
    assert [len(c.token_ids) for c in stopped[0]] == [1, 1]  # without ignore_eos every row ends at once
    clock = iter([0.0, 9.0, 10.0, 11.0, 20.0, 24.0, 30.0, 32.0])  # (start, end) per call: 9 s, then 1, 4, 2
    monkeypatch.setattr(sampling_throughput.time, "perf_counter", lambda: next(clock))
    generated: list[list[int]] = []
    real = Sampler.generate_ids

    def spy(self, prompts, params, n, *args, **kwargs):
        out = real(self, prompts, params, n, *args, **kwargs)
        generated.append([len(c.token_ids) for row in out for c in row])
        return out

    monkeypatch.setattr(Sampler, "generate_ids", spy)
    stats = sampling_throughput.measure_sampling_throughput(
        model, prompt_len=5, new_tokens=4, n=3, num_prompts=2, repeats=3
    )
    assert generated == [[4] * 6] * 4  # one warm-up + 3 timed calls; 2 prompts x 3 samples, never cut at EOS
    assert stats["seconds"] == 2.0  # median of 1, 4, 2: the 9 s warm-up is not counted
    assert stats["tokens_per_s"] == 12.0  # 6 rows x 4 tokens in 2 s
    assert stats["sequences"] == 6 and stats["device"] == "cpu" and stats["cuda_graph"] is False


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="must be positive"):
        sampling_throughput.measure_sampling_throughput(_llama_that_always_says_eos(), prompt_len=4, new_tokens=0, n=1)
