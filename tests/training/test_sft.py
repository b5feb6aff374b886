"""The SFT recipe end to end on tiny models: packing, accumulation, adapters, non-finite steps,
metrics (exact resume after SIGKILL, for every recipe: tests/training/test_recipes.py)."""

from __future__ import annotations

import pytest
import torch

from fastpeft.training.data import collate, pack_examples, tokenize_records, unpacked_rows
from fastpeft.training.losses import CausalLMLoss
from fastpeft.training.metrics import read_metrics
from fastpeft.training.model_setup import build_model
from fastpeft.training.sft import SFTConfig, train


def _config(tmp_path, tiny_llama, records, **kw) -> SFTConfig:
    base = dict(
        model_config=tiny_llama(),
        finetune="full",
        train_data=records,
        max_steps=3,
        micro_batch_size=4,
        lr=1e-2,
        output_dir=str(tmp_path / "run"),
        progress=False,
        plot=False,
        log_every=1,
        max_seq_len=64,
    )
    base.update(kw)
    return SFTConfig(**base)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(attn, tiny_llama, char_tokenizer, arithmetic_records):
    model = build_model(None, tiny_llama(), attn_implementation=attn, seed=1)
    exs = tokenize_records(arithmetic_records[:10], char_tokenizer, 128)
    losses = {}
    for packed, rows in ((True, pack_examples(exs, 128)), (False, unpacked_rows(exs))):
        b = collate(rows, char_tokenizer.pad_token_id)
        for impl in ("fastpeft", "full"):
            loss, n = CausalLMLoss(model, impl)(
                b["input_ids"], b["labels"], b["position_ids"], b["segment_ids"], packed=packed
            )
            losses[packed, impl] = (loss.item(), n.item())
    assert len(pack_examples(exs, 128)) < len(exs)  # packing really put several examples in a row
    ref = losses[False, "full"]
    for key, (loss, n) in losses.items():
        assert n == ref[1], key
        assert loss == pytest.approx(ref[0], rel=1e-5), key


def test_grad_accumulation_equals_big_batch(tmp_path, tiny_llama, arithmetic_records):
    runs = []
    for mb, accum in ((4, 1), (2, 2), (1, 4)):
        cfg = _config(
            tmp_path / f"{mb}",
            tiny_llama,
            arithmetic_records[:16],
            micro_batch_size=mb,
            grad_accum_steps=accum,
            optimizer="sgd",
            max_grad_norm=None,
        )
        result = train(cfg)
        runs.append([r["loss"] for r in read_metrics(tmp_path / f"{mb}" / "run" / "metrics.jsonl") if "loss" in r])
        assert result.steps == 3
    for other in runs[1:]:
        assert other == pytest.approx(runs[0], rel=1e-5)


def test_full_finetune_learns_and_writes_outputs(tmp_path, tiny_llama, arithmetic_records):
    cfg = _config(
        tmp_path,
        tiny_llama,
        arithmetic_records[:48],
        eval_data=arithmetic_records[48:52],
        max_steps=12,
        eval_every=6,
        eval_match="answer",
        eval_max_new_tokens=8,
        plot=True,
        packing=True,
        gradient_checkpointing=True,
    )
    model = build_model(None, tiny_llama(), seed=0)
    result = train(cfg, model=model)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.7
    assert any("eval_loss" in r and r["step"] == 6 for r in records)
    assert result.eval["exact_match"] is not None and result.eval["eval_loss"] > 0
    assert result.peak_memory_bytes > 0 and result.tokens_per_s > 0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    reloaded = build_model(str(result.saved), None)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_lora_and_qlora_runs_save_loadable_adapters(tmp_path, tiny_llama, arithmetic_records):
    fastpeft = pytest.importorskip("fastpeft")
    for mode in ("lora", "qlora"):
        cfg = _config(
            tmp_path / mode, tiny_llama, arithmetic_records[:16], finetune=mode, lora={"r": 4}, seed=5, save_every=3
        )
        result = train(cfg)
        assert (result.saved / "adapter_model.safetensors").is_file()
        assert (result.output_dir / "checkpoints" / "step-000003" / "adapter" / "adapter_config.json").is_file()
        model = build_model(None, tiny_llama(), seed=5)
        fastpeft.load_adapter(model, result.saved, **({"quantize": "nf4"} if mode == "qlora" else {}))
        assert fastpeft.list_adapters(model) == ["default"]


@pytest.mark.parametrize("mode", ["full", "qlora"])  # LoRA, and the other recipes: test_recipes.py
def test_bf16_autocast_tracks_fp32(mode, tmp_path, tiny_llama, arithmetic_records):
    losses = {}
    for bf16 in (False, True):
        cfg = _config(
            tmp_path / str(bf16),
            tiny_llama,
            arithmetic_records[:8],
            finetune=mode,
            bf16=bf16,
            max_steps=3,
            lora={"r": 4},
            seed=3,
            lr=3e-3,
        )
        train(cfg)
        losses[bf16] = [r["loss"] for r in read_metrics(f"{cfg.output_dir}/metrics.jsonl") if r.get("loss") is not None]
    assert len(losses[True]) == len(losses[False]) == 3
    # same data, same init: bf16 compute stays within bf16 rounding of the fp32 run, and it learns
    assert losses[True] == pytest.approx(losses[False], rel=3e-2)
    assert losses[True][-1] < losses[True][0]


def test_non_finite_step_is_skipped_then_run_stops(tmp_path, tiny_llama, arithmetic_records):
    model = build_model(None, tiny_llama(), seed=0)
    poison = {"steps": {2}}
    calls = {"n": 0}

    def hook(module, args, output):  # makes the forward of optimizer step 2 produce NaN
        calls["n"] += 1
        if calls["n"] in poison["steps"]:
            return output * float("nan")
        return output

    model.model.norm.register_forward_hook(hook)
    snapshots = []
    cfg = _config(tmp_path, tiny_llama, arithmetic_records[:8], max_steps=3, micro_batch_size=8)
    with pytest.warns(UserWarning, match="step 2: non-finite"):
        train(cfg, model=model, callbacks=[lambda s, r: snapshots.append(model.lm_head.weight.detach().clone())])
    assert torch.equal(snapshots[0], snapshots[1]) and not torch.equal(snapshots[1], snapshots[2])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert any(r.get("skipped") == "non-finite" and r["step"] == 2 for r in records)

    poison["steps"] = set(range(1, 100))
    calls["n"] = 0
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="max_bad_steps=1"):
        train(
            _config(
                tmp_path / "b", tiny_llama, arithmetic_records[:8], max_steps=5, micro_batch_size=8, max_bad_steps=1
            ),
            model=model,
        )


def test_domain_adaptive_mix_with_adapters_in_last_layers(tmp_path, tiny_llama, arithmetic_records):
    safetensors = pytest.importorskip("safetensors.torch")
    general = [{"prompt": f"Say {w}:", "completion": f" {w}"} for w in ("cat", "dog", "sun", "sky", "sea")]
    cfg = _config(
        tmp_path,
        tiny_llama,
        arithmetic_records[:24],
        general_data=general,
        general_fraction=0.2,
        finetune="lora",
        lora={"r": 4},
        eval_data=arithmetic_records[60:],
        eval_match="answer",
        eval_max_new_tokens=4,
        max_steps=2,
    )
    result = train(cfg)
    start = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert start["rows"] == 30  # 24 domain records are 80% of the mixture
    keys = safetensors.load_file(str(result.saved / "adapter_model.safetensors")).keys()
    assert keys and all(".layers.1." in k for k in keys)  # default: last 10% of blocks, at least one
    assert result.eval["exact_match"] is not None  # held-out domain questions


def test_resume_refuses_a_different_data_layout(tmp_path, tiny_llama, arithmetic_records):
    train(_config(tmp_path, tiny_llama, arithmetic_records[:16], save_every=2, max_steps=2))
    with pytest.raises(ValueError, match="data layout"):
        train(_config(tmp_path, tiny_llama, arithmetic_records[:16], resume=True, micro_batch_size=2, max_steps=4))
