"""Resume survives damaged checkpoints and says what it did: a flipped byte or a truncated file is
caught by the manifest and the run falls back to the previous complete checkpoint (one warning
line); a torn metrics line does not block resume; a missing RNG file or a changed lr / seed is
named in a warning."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from fastpeft.training import checkpoint as ckpt
from fastpeft.training.metrics import MetricsLogger, read_metrics
from fastpeft.training.sft import SFTConfig, train


def _config(out, tiny_llama, records, **kw) -> SFTConfig:
    base = dict(
        model_config=tiny_llama(),
        finetune="lora",
        lora={"r": 4, "lora_alpha": 8},
        train_data=records,
        micro_batch_size=4,
        lr=1e-2,
        output_dir=str(out),
        progress=False,
        plot=False,
        log_every=1,
        max_seq_len=64,
        save_every=1,
        keep_checkpoints=0,
        scheduler="constant",
    )
    base.update(kw)
    return SFTConfig(**base)


def _loss_at(run, step: int) -> float:
    return next(r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("step") == step and "loss" in r)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, arithmetic_records):
    """A 3-step run with a checkpoint per step, and its step-3 loss (a resume from step 2 must
    reproduce it exactly)."""
    root = tmp_path_factory.mktemp("ckpt")
    records = arithmetic_records[:32]
    train(_config(root / "three", tiny_llama, records, max_steps=3))
    return root / "three", _loss_at(root / "three", 3), records


def _copy(runs, tmp_path):
    src, reference, records = runs
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst, reference, records


def _resume(run, tiny_llama, records, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(_config(run, tiny_llama, records, max_steps=4, resume=True, **kw))
    return result, [str(w.message) for w in caught if "resum" in str(w.message) or "checkpoint" in str(w.message)]


def test_every_checkpoint_has_a_manifest_of_sizes_and_hashes(runs):
    step = runs[0] / "checkpoints" / "step-000003"
    files = json.loads((step / "manifest.json").read_text())["files"]
    assert {
        "trainable.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng-rank0.pt",
        "adapter/adapter_model.safetensors",
    } <= set(files)
    assert all(len(e["sha256"]) == 64 and e["bytes"] == (step / n).stat().st_size for n, e in files.items())
    assert ckpt.checkpoint_problem(step) is None


def test_a_flipped_byte_falls_back_to_the_previous_checkpoint(runs, tmp_path, tiny_llama):
    run, reference, records = _copy(runs, tmp_path)
    target = run / "checkpoints" / "step-000003" / "trainable.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x40  # inside a tensor: safetensors itself would load it without complaint
    target.write_bytes(bytes(data))
    _, messages = _resume(run, tiny_llama, records)
    assert messages == [
        "checkpoint step-000003 is damaged (trainable.safetensors does not match its SHA-256 in "
        "the manifest): resuming from step-000002 instead"
    ]
    assert _loss_at(run, 3) == pytest.approx(reference, rel=1e-9)  # step 3 redone exactly


def test_a_truncated_file_falls_back_too(runs, tmp_path, tiny_llama):
    run, reference, records = _copy(runs, tmp_path)
    target = run / "checkpoints" / "step-000003" / "optimizer.pt"
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[: size // 2])
    result, messages = _resume(run, tiny_llama, records)
    assert len(messages) == 1 and f"optimizer.pt has {size // 2} bytes, the manifest says {size}" in messages[0]
    assert result.steps == 4 and _loss_at(run, 3) == pytest.approx(reference, rel=1e-9)


def test_every_checkpoint_damaged_is_an_error_naming_them(runs, tmp_path, tiny_llama):
    run, _, records = _copy(runs, tmp_path)
    for step in ckpt.list_checkpoints(run / "checkpoints"):
        (step / "scheduler.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no intact checkpoint.*step-000003 is damaged.*step-000001 is damaged"):
        train(_config(run, tiny_llama, records, max_steps=4, resume=True))


def test_a_missing_rng_file_is_named(runs, tmp_path, tiny_llama):
    run, _, records = _copy(runs, tmp_path)
    latest = run / "checkpoints" / "step-000003"
    (latest / "rng-rank0.pt").unlink()
    _, messages = _resume(run, tiny_llama, records)
    assert messages == [
        "checkpoint step-000003 is damaged (rng-rank0.pt is missing): resuming from step-000002 instead"
    ]
    # a checkpoint from before manifests: resumed, with a warning naming the file
    run2, _, _ = _copy(runs, tmp_path / "legacy")
    legacy = run2 / "checkpoints" / "step-000003"
    (legacy / "manifest.json").unlink()
    (legacy / "rng-rank0.pt").unlink()
    _, messages = _resume(run2, tiny_llama, records)
    assert len(messages) == 1 and "has no rng-rank0.pt" in messages[0]


@pytest.mark.parametrize("change, named", [({"lr": 0.02}, "lr 0.01 -> 0.02"), ({"seed": 3}, "seed 0 -> 3")])
def test_a_changed_lr_or_seed_is_named(runs, tmp_path, tiny_llama, change, named):
    run, _, records = _copy(runs, tmp_path)
    _, messages = _resume(run, tiny_llama, records, **change)
    assert len(messages) == 1 and named in messages[0] and "\n" not in messages[0]


def test_a_torn_metrics_line_does_not_block_resume(runs, tmp_path, tiny_llama):
    run, _, records = _copy(runs, tmp_path)
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 4, "loss": 0.12')  # the process died mid-write
    result, _ = _resume(run, tiny_llama, records)
    assert result.steps == 4
    steps = [r["step"] for r in read_metrics(metrics) if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_read_metrics_skips_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)
    with pytest.warns(UserWarning, match="metrics.jsonl:2"):  # resume drops it and goes on
        MetricsLogger(path, resume_step=3)
    assert [r["step"] for r in read_metrics(path)] == [1, 3]
