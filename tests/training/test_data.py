"""Records, completion-only labels, chat templates, packing, deterministic batching, mixing."""

from __future__ import annotations

import json

import pytest

from fastpeft.training.data import (
    IGNORE_INDEX,
    BatchPlan,
    collate,
    load_records,
    mix_datasets,
    pack_examples,
    tokenize_record,
    tokenize_records,
    unpacked_rows,
)
from fastpeft.training.tokenizer import load_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_char_tokenizer()


def _targets(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


def test_load_records_jsonl_json_list(tmp_path):
    recs = [{"prompt": "a", "completion": "b"}, {"text": "c"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps({"train": recs}))
    assert load_records(tmp_path / "d.jsonl") == recs
    assert load_records(str(tmp_path / "d.json")) == recs
    assert load_records(recs) == recs
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_records(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(TypeError, match="int"):
        load_records(3)


def test_load_records_from_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])
    assert load_records(ds) == [{"prompt": "p", "completion": "c"}]


def test_prompt_completion_labels_only_completion_and_eos(tok):
    ex = tokenize_record({"prompt": "Q: 1+2=?\nA:", "completion": " 3"}, tok, 64)
    assert tok.decode(ex.input_ids) == "Q: 1+2=?\nA: 3</s>"
    assert _targets(tok, ex) == " 3</s>"
    assert ex.labels[: len("Q: 1+2=?\nA:")] == [IGNORE_INDEX] * len("Q: 1+2=?\nA:")
    full = tokenize_record({"prompt": "ab", "completion": "c"}, tok, 64, completion_only=False)
    assert _targets(tok, full) == "abc</s>"


def test_chat_labels_cover_assistant_turns_only(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ex = tokenize_record({"messages": messages}, tok, 256)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert _targets(tok, ex) == "yo</s>\n4</s>\n"
    # prompt/completion through the chat template is the same as a two-turn conversation
    via_template = tokenize_record({"prompt": "hi", "completion": "yo"}, tok, 256, use_chat_template=True)
    two_turns = tokenize_record({"messages": messages[1:3]}, tok, 256)
    assert via_template == two_turns


def test_text_records_and_truncation(tok):
    ex = tokenize_record({"text": "abc"}, tok, 64)
    assert _targets(tok, ex) == "abc</s>"
    assert tokenize_record({"prompt": "x" * 10, "completion": "y"}, tok, 8) is None  # target cut off
    with pytest.warns(UserWarning, match="dropped 1 records"):
        out = tokenize_records([{"prompt": "x" * 10, "completion": "y"}, {"text": "ok"}], tok, 8)
    assert len(out) == 1
    with pytest.raises(ValueError, match="none of"):
        tokenize_record({"question": "x"}, tok, 8)


def test_packing_keeps_examples_apart(tok):
    recs = [{"prompt": f"p{i}", "completion": "c" * (i % 5 + 1)} for i in range(9)]
    exs = tokenize_records(recs, tok, 16)
    rows = pack_examples(exs, 16)
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in exs)
    assert len(rows) < len(exs)
    flat_ids, flat_labels = [], []
    for row in rows:
        assert len(row.input_ids) <= 16
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert starts[0] == 0
        for s in starts:  # each example starts at position 0 with an unpredictable first token
            assert row.labels[s] == IGNORE_INDEX
        assert row.segment_ids == sorted(row.segment_ids) and 0 not in row.segment_ids
        flat_ids += row.input_ids
        flat_labels += row.labels
    assert flat_ids == sum((e.input_ids for e in exs), [])
    assert flat_labels == sum(([IGNORE_INDEX] + e.labels[1:] for e in exs), [])
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        pack_examples(exs, 3)


def test_collate_pads_right(tok):
    rows = unpacked_rows(tokenize_records([{"text": "abc"}, {"text": "abcdefghij"}], tok, 64))
    batch = collate(rows, tok.pad_token_id, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 16)
    assert (batch["input_ids"][0, 4:] == tok.pad_token_id).all()
    assert (batch["labels"][0, 4:] == IGNORE_INDEX).all()
    assert batch["segment_ids"][0].tolist() == [1] * 4 + [0] * 12
    assert batch["position_ids"][1, :11].tolist() == list(range(11))


def _ids(batches):
    return [[r.input_ids[0] for r in mb] for mb in batches]


def test_batch_plan_is_a_function_of_step_and_splits_ranks():
    from fastpeft.training.data import Row

    rows = [Row([i], [i], [0], [1]) for i in range(50)]
    single = BatchPlan(rows, micro_batch_size=2, grad_accum_steps=2, seed=3)
    assert single.steps_per_epoch == 12
    fresh = BatchPlan(rows, micro_batch_size=2, grad_accum_steps=2, seed=3)
    assert _ids(single.micro_batches(13)) == _ids(fresh.micro_batches(13))  # resume replays
    for step in (0, 5, 12, 30):
        whole = sum(_ids(single.micro_batches(step)), [])
        r0 = BatchPlan(rows, 2, 1, world_size=2, rank=0, seed=3).micro_batches(step)
        r1 = BatchPlan(rows, 2, 1, world_size=2, rank=1, seed=3).micro_batches(step)
        assert sum(_ids(r0), []) + sum(_ids(r1), []) == whole
    epoch0 = sum((sum(_ids(single.micro_batches(s)), []) for s in range(12)), [])
    assert len(set(epoch0)) == 48  # no row twice within an epoch
    epoch1 = sum((sum(_ids(single.micro_batches(s)), []) for s in range(12, 24)), [])
    assert epoch0 != epoch1  # reshuffled per epoch
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchPlan(rows[:3], 2, 2)


def test_mix_datasets_ratio():
    general = [{"text": f"g{i}"} for i in range(30)]
    domain = [{"text": f"d{i}"} for i in range(80)]
    mixed = mix_datasets(general, domain, general_fraction=0.2, seed=0)
    assert len(mixed) == 100
    assert sum(r["text"].startswith("g") for r in mixed) == 20
    assert len({r["text"] for r in mixed if r["text"].startswith("d")}) == 80  # no domain repeats
    assert mix_datasets(general, domain, 0.2, seed=0) == mixed
    small = mix_datasets(general[:2], domain, 0.5, total=10, seed=1)
    assert sum(r["text"].startswith("g") for r in small) == 5  # cycles the small source
    with pytest.raises(ValueError, match="general_fraction"):
        mix_datasets(general, domain, 1.5)
