"""Automatic step labels: Monte Carlo labels hand-checked on a mock policy, checker labels, the
resumable builder and its CLI."""

from __future__ import annotations

import json
import random
import zlib

import pytest

from fastpeft.demo.hard_tier import check_steps, make_hard_dataset
from fastpeft.reasoning.types import Completion, SamplingParams
from fastpeft.training.step_labels import (
    CheckerLabeller,
    MonteCarloLabeller,
    StepLabelConfig,
    build_step_labels,
    import_checker,
    label_summary,
    outcome_records,
    step_ends,
)

PROMPT = "Q: 2+3=?\nA:"
# what the mock policy writes after each text: rollout j of a prefix is ROLLOUTS[text][j]
ROLLOUTS = {
    PROMPT: [" 2+3=5; answer 5", " 2+3=6; answer 6", " 2+3=5; answer 5", " 2+3=4; answer 4"],
    PROMPT + " 2+3=5; ": ["answer 5", "answer 5", "answer 5", "answer 6"],
    PROMPT + " 2+3=6; ": ["answer 6", "answer 6", "answer 6", "answer 6"],
}


class TablePolicy:
    """Rollouts looked up in a table; records every call (prompts, n)."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def generate(self, prompts, params, n=1, adapters=None):
        self.calls.append((list(prompts), n))
        return [[Completion(self.table[p][j], [0], [0.0], "eos") for j in range(n)] for p in prompts]


def test_step_ends_cover_every_prefix():
    assert step_ends(" 2+3=5; answer 5") == [0, 8, 16]
    assert step_ends(" 2+3=5; ") == [0, 8]  # a response cut after a delimiter has no tail
    assert step_ends("") == [0]


def test_monte_carlo_labels_by_hand():
    policy = TablePolicy(ROLLOUTS)
    labeller = MonteCarloLabeller(policy, SamplingParams(max_new_tokens=16), rollouts=4)
    right, wrong = labeller.label([(PROMPT, "5", " 2+3=5; answer 5"), (PROMPT, "5", " 2+3=6; answer 6")])
    # bare question: 2 of 4 rollouts reach 5; after "2+3=5; ": 3 of 4; the full response: its outcome
    assert right["soft"] == [0.5, 0.75, 1.0] and right["hard"] == [1, 1, 1] and right["outcome"] == 1
    # after the wrong step no rollout recovers; the wrong final answer is 0
    assert wrong["soft"] == [0.5, 0.0, 0.0] and wrong["hard"] == [1, 0, 0] and wrong["outcome"] == 0
    assert right["step_ends"] == [0, 8, 16] and right["rollouts"] == 4
    # all four proper prefixes in one batched call of K rows each
    assert policy.calls == [([PROMPT, PROMPT + " 2+3=5; ", PROMPT, PROMPT + " 2+3=6; "], 4)]


def test_rollouts_kept_as_outcome_data():
    labeller = MonteCarloLabeller(TablePolicy(ROLLOUTS), SamplingParams(), rollouts=4, keep_rollouts=True)
    (rec,) = labeller.label([(PROMPT, "5", " 2+3=6; answer 6")])
    assert rec["rollout_texts"] == [ROLLOUTS[PROMPT], ROLLOUTS[PROMPT + " 2+3=6; "]]
    data = outcome_records([rec])
    assert len(data) == 1 + 4 + 4
    assert [d["outcome"] for d in data] == [0, 1, 0, 1, 0, 0, 0, 0, 0]
    assert data[5]["response"] == " 2+3=6; answer 6" and data[5]["step_ends"] == [0, 8, 16]


def test_builder_without_rollouts_writes_outcomes_and_checker_labels(tmp_path):
    full = make_hard_dataset(3, seed=0)
    config = StepLabelConfig(
        output=str(tmp_path / "h.jsonl"),
        rollouts=0,
        samples_per_prompt=2,
        progress=False,
        checker="fastpeft.demo.hard_tier:check_steps",
    )
    build_step_labels(config, SeededPolicy(full), [{"prompt": r["prompt"], "answer": r["answer"]} for r in full])
    lines = [json.loads(x) for x in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all("soft" not in x and len(x["checker"]) == len(x["step_ends"]) for x in lines)
    assert label_summary(tmp_path / "h.jsonl")["soft_mean"] is None


def test_monte_carlo_splits_calls_by_max_rows():
    policy = TablePolicy(ROLLOUTS)
    MonteCarloLabeller(policy, SamplingParams(), rollouts=4, max_rows=8).label(
        [(PROMPT, "5", " 2+3=5; answer 5"), (PROMPT, "5", " 2+3=6; answer 6")]
    )
    assert [len(p) for p, _ in policy.calls] == [2, 2]
    with pytest.raises(ValueError, match="max_rows"):
        MonteCarloLabeller(policy, SamplingParams(), rollouts=4, max_rows=3)


def test_checker_labels_on_the_hard_tier():
    rec = make_hard_dataset(1, seed=3, kinds=("word",))[0]
    steps = rec["completion"].split("; ")
    broken = "; ".join([steps[0], "1+1=3", *steps[2:]])
    labeller = CheckerLabeller(check_steps)
    assert labeller.labels(rec["prompt"], rec["completion"]) == [1, 1, 1, 1, 1]
    assert labeller.labels(rec["prompt"], broken) == [1, 1, 0, 0, 0]
    assert import_checker("fastpeft.demo.hard_tier:check_steps") is check_steps
    with pytest.raises(ValueError, match=r"package\.module:function"):
        import_checker("check_steps")


class SeededPolicy:
    """Deterministic in (prompt, seed, row): the hard tier's reference with occasional wrong answers."""

    def __init__(self, records, fail_on_call=None):
        self.reference = {r["prompt"]: r for r in records}
        self.calls, self.fail_on_call = 0, fail_on_call

    def generate(self, prompts, params, n=1, adapters=None):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("interrupted")
        out = []
        for p in prompts:
            head = next(q for q in self.reference if p.startswith(q))
            done = p[len(head) :]
            full = self.reference[head]["completion"]
            rows = []
            for j in range(n):
                rng = random.Random(zlib.crc32(f"{p}|{params.seed}|{j}".encode()))
                text = full[len(done) :] if full.startswith(done) else "answer 0"
                if rng.random() < 0.3:
                    text = text.rsplit("answer", 1)[0] + "answer 1"
                rows.append(Completion(text, [0], [0.0], "eos"))
            out.append(rows)
        return out


def test_builder_resumes_to_the_same_file(tmp_path):
    records = [{"prompt": r["prompt"], "answer": r["answer"]} for r in make_hard_dataset(5, seed=0)]
    full = [{**r, "completion": c["completion"]} for r, c in zip(records, make_hard_dataset(5, seed=0))]
    config = StepLabelConfig(
        output=str(tmp_path / "a.jsonl"),
        rollouts=3,
        batch_prompts=2,
        samples_per_prompt=2,
        checker="fastpeft.demo.hard_tier:check_steps",
        progress=False,
    )
    summary = build_step_labels(config, SeededPolicy(full), records)
    assert summary["written"] == 10 and summary["records"] == 10
    # interrupted in chunk 2 (calls: solutions + rollouts per chunk), then resumed
    resumed = StepLabelConfig(**{**config.__dict__, "output": str(tmp_path / "b.jsonl")})
    with pytest.raises(RuntimeError, match="interrupted"):
        build_step_labels(resumed, SeededPolicy(full, fail_on_call=4), records)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 4
    again = build_step_labels(resumed, SeededPolicy(full), records)
    assert again["written"] == 6
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for x in lines:
        assert len(x["soft"]) == len(x["hard"]) == len(x["checker"]) == len(x["step_ends"])
        assert x["checker"][-1] == x["outcome"] or x["checker"][-1] == 0
    assert 0 < label_summary(tmp_path / "a.jsonl")["sampled_accuracy"] < 1
    with pytest.raises(ValueError, match="other settings"):
        build_step_labels(StepLabelConfig(**{**resumed.__dict__, "rollouts": 4}), SeededPolicy(full), records)


def test_builder_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="'answer'"):
        build_step_labels(
            StepLabelConfig(output=str(tmp_path / "x.jsonl"), progress=False),
            SeededPolicy([]),
            [{"prompt": "Q: 1+1=?\nA:"}],
        )
    with pytest.raises(ValueError, match="rollouts must be >= 0"):
        StepLabelConfig(rollouts=-1)
    with pytest.raises(ValueError, match="temperature"):
        StepLabelConfig(temperature=0.0)
