"""The memory ledger of the GRPO and DPO recipes (fake tensors): the sampling phase holds the KV cache
the sampler makes (each prompt's KV once), TRL's repeated-prompt fp32 cache is larger, and the
training phases end with gradients applied; the RESULTS.md section renders what was measured."""

from __future__ import annotations

import warnings

import pytest

from fastpeft.training.ledger_recipes import RecipeLedgerSpec, measure_recipe

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
P, C, G = 16, 512, 4


def _kv_bytes(rows_tokens: int, element_size: int) -> int:
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    return rows_tokens * TINY["num_hidden_layers"] * 2 * TINY["num_key_value_heads"] * head_dim * element_size


@pytest.fixture(scope="module")
def grpo():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            stack: measure_recipe(
                RecipeLedgerSpec(TINY, "grpo", stack, prompt_len=P, completion_len=C, group_size=G, micro_batch_size=2)
            )
            for stack in ("fastpeft", "trl")
        }


def test_grpo_sampling_holds_the_shared_prefix_kv_cache(grpo):
    ours, trl = grpo["fastpeft"]["sampling"], grpo["trl"]["sampling"]
    shared = _kv_bytes(P + G * C, 2)  # bf16: the prompt's KV once, each completion's own
    assert ours.peak_phase == "forward" and ours.peak_by_category["activations"] >= shared
    # TRL's generate: the prompt repeated G times, in the prepared model's fp32
    assert trl.peak_by_category["activations"] >= _kv_bytes(G * (P + C), 4) > ours.peak_by_category["activations"]


def test_recipe_training_phases_apply_gradients():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dpo = measure_recipe(RecipeLedgerSpec(TINY, "dpo", prompt_len=8, completion_len=24, num_prompts=2))
    for result in (dpo["training"],):
        assert result.peak_phase in ("backward", "optimizer")
        assert result.peak_by_category["trainable"] > 0 and result.peak_by_category["backward"] > 0
    with pytest.raises(ValueError, match="recipe"):
        RecipeLedgerSpec(TINY, "ppo")


def test_results_section_renders_each_target(grpo, monkeypatch):
    from fastpeft.cli.bench import load_benchmarks

    load_benchmarks()
    from fastpeft_benchmarks import recipe_ledger_report as report

    monkeypatch.setattr(
        report,
        "_measure_one",
        lambda *args: {
            "phases": {k: v.to_json() for k, v in grpo[args[6]].items()},
            "design": args[7],
            "peak_bytes": max(v.peak_bytes for v in grpo[args[6]].values()),
        },
    )
    data = report.measure(small=True, log=lambda s: None)
    text = report.render({**data, "command": "fastpeft bench --ledger-recipes"})
    assert [row["fastpeft"]["peak_bytes"] for row in data["targets"]] == [
        max(v.peak_bytes for v in grpo["fastpeft"].values())
    ] * len(report.TARGETS)
    for label, *_ in report.TARGETS:
        assert label in text
    assert "| **peak (device)** |" in text and "yes" in text
