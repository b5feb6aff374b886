"""The PRM evidence: its helpers by hand (paired standard errors, clustered pairwise accuracy, the
shared sample pool, the hard tier) and the --quick run end to end (structure, not accuracy)."""

from __future__ import annotations

import json
import math

import pytest

from fastpeft.demo.hard_tier import check_steps, make_hard_dataset, mul_steps, reference_steps, sum_steps
from fastpeft.demo.prm_report import pairwise_with_se
from fastpeft.demo.prm_search_eval import SamplePool, paired_difference, search_configs
from fastpeft.reasoning.answers import is_correct
from fastpeft.reasoning.types import Completion, SamplingParams


def test_hard_tier_by_hand():
    assert sum_steps(9542, 768) == [
        "2+8=10 write 0 carry 1",
        "4+6+1=11 write 1 carry 1",
        "5+7+1=13 write 3 carry 1",
        "9+0+1=10 write 0 carry 1",
        "write 1",
    ]
    assert mul_steps(4821, 7) == [
        "1*7=7",
        "2*7=14 write 4 carry 1",
        "8*7+1=57 write 7 carry 5",
        "4*7+5=33 write 3 carry 3",
        "write 3",
    ]
    data = make_hard_dataset(60, seed=4)
    assert data == make_hard_dataset(60, seed=4) and {r["kind"] for r in data} == {"sum", "mul", "word"}
    for r in data:
        assert is_correct(r["completion"], r["answer"]) and all(check_steps(r["prompt"], r["completion"]))
        assert reference_steps(r["prompt"])[-1] == f"answer {r['answer']}"
    word = next(r for r in data if r["kind"] == "word")
    steps = word["completion"].split("; ")
    assert check_steps(word["prompt"], "; ".join([*steps[:1], "1+1=3", *steps[2:]])) == [True, False, False, False]
    with pytest.raises(ValueError, match="not a hard-tier prompt"):
        reference_steps("Q: what?\nA:")


def test_paired_difference_and_clustered_pairwise_by_hand():
    d, se = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert d == 0.5 and se == pytest.approx(math.sqrt(4 * 0.25 / 3 / 4))  # differences 1, 0, 0, 1
    # prompt a: right 0.9 vs wrong 0.2 and 0.95 -> 1 win of 2; prompt b: 1 of 1; 2/3 overall
    r = pairwise_with_se([0.9, 0.2, 0.95, 0.6, 0.1], [1, 0, 0, 1, 0], ["a", "a", "a", "b", "b"])
    assert r["accuracy"] == pytest.approx(2 / 3) and r["pairs"] == 3 and r["prompts"] == 2
    # clustered: groups (wins, pairs) = (1, 2), (1, 1): residuals 1 - 4/3, 1 - 2/3
    assert r["se"] == pytest.approx(math.sqrt(2 * ((1 - 4 / 3) ** 2 + (1 - 2 / 3) ** 2)) / 3)
    assert pairwise_with_se([0.5], [1], ["a"])["accuracy"] is None


class Counter:
    def __init__(self):
        self.calls = 0

    def generate(self, prompts, params, n=1, adapters=None):
        self.calls += 1
        return [
            [Completion(f"s{params.seed}-{j}", [1] * (5 + j), [0.0] * (5 + j), "eos") for j in range(n)]
            for _ in prompts
        ]


class Tok:
    def decode(self, ids):
        return "x" * len(ids)


def test_pool_is_shared_and_cut_to_the_budget():
    sampler = Counter()
    pool = SamplePool(sampler, Tok(), SamplingParams(max_new_tokens=16, temperature=0.8), chunk=4)
    a, b = pool.view(), pool.view()
    first = a.generate(["p"], SamplingParams(max_new_tokens=16, temperature=0.8), n=3)[0]
    assert [c.text for c in b.generate(["p"], SamplingParams(max_new_tokens=16, temperature=0.8), n=3)[0]] == [
        c.text for c in first
    ]  # another reader sees the same samples
    more = a.generate(["p"], SamplingParams(max_new_tokens=6, temperature=0.8), n=3)[0]  # crosses a chunk
    assert sampler.calls == 2 and [c.num_tokens for c in more] == [6, 5, 6]
    assert more[0].finish_reason == "length" and more[0].text == "xxxxxx" and more[1].finish_reason == "eos"
    with pytest.raises(ValueError, match="temperature"):
        a.generate(["p"], SamplingParams(temperature=0.0), n=1)


def test_configurations_spend_the_budget_their_way():
    configs = search_configs([256, 4096], 170, 28, 8)
    assert configs["beam_prm@4096"]["n"] == 40 and configs["beam_prm@4096"]["beam_width"] == 4
    assert configs["beam_prm@256"]["n"] == 2 and configs["bon_oracle@256"]["source"] == "pool"
    assert configs["fixed_allocation@4096"]["beam_n"] % 3 == 0


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, one_thread):
    from fastpeft.demo.prm_evidence import EvidenceSettings, run

    results = run(tmp_path, EvidenceSettings.quick(), progress=False)
    saved = json.loads((tmp_path / "evidence.json").read_text())
    assert {"reward_models", "search", "allocation", "grpo", "swarm", "shared_batch", "targets"} <= set(saved)
    assert len(results["targets"]) == 4 and all("value" in t and "se" in t for t in results["targets"])
    assert set(saved["search"]["test"]) >= {"greedy", "beam_prm@256", "bon_orm@256", "bon_oracle@256"}
    shared = saved["shared_batch"]
    assert shared["scores_compared"] > 0 and shared["max_score_diff"] < 1e-4  # decode scores = a separate pass
    assert len(saved["grpo"]["runs"]) == 2 and len(saved["swarm"]["rows"]) == 4
    text = (tmp_path / "evidence.md").read_text()
    assert "## Targets" in text and "beam search + PRM" in text
    assert (tmp_path / "evidence.png").stat().st_size > 0 and (tmp_path / "grpo_curves.png").stat().st_size > 0
    again = run(tmp_path, EvidenceSettings.quick(), progress=False)  # every stage cached: same numbers
    assert again["search"] == results["search"]
