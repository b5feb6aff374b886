"""DPO: the reference is the adapter-disabled model, a few steps move the loss, precomputed reference
log-probs match on-the-fly ones, IPO runs (exact resume: tests/training/test_recipes.py)."""

import copy
import json
import warnings

import pytest
import torch

import fastpeft
from fastpeft.demo.arithmetic import make_arithmetic_dataset
from fastpeft.training.dpo import DPOConfig, PairLogprobs, reference_logprobs, train
from fastpeft.training.model_setup import build_model
from fastpeft.training.pairs import tokenize_pairs
from fastpeft.training.tokenizer import load_char_tokenizer

PAIRS = [
    {
        "prompt": r["prompt"],
        "chosen": r["completion"],
        "rejected": r["completion"].replace(f"answer {r['answer']}", "answer 0"),
    }
    for r in make_arithmetic_dataset(8, seed=4)
]


def _config(model_config, tmp_path, name, **kw):
    base = dict(
        model_config=model_config,
        train_data=PAIRS,
        max_steps=4,
        lr=1e-2,
        beta=0.5,
        micro_batch_size=4,
        lora={"r": 4, "lora_alpha": 8},
        output_dir=str(tmp_path / name),
        progress=False,
        plot=False,
        device="cpu",
    )
    return DPOConfig(**{**base, **kw})


def _losses(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if json.loads(x).get("loss") is not None]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_reference_is_the_base_model_without_a_copy(tiny_config):
    tok = load_char_tokenizer()
    model = build_model(None, tiny_config, seed=0)
    base = copy.deepcopy(model)
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # make the adapter matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    pairs = tokenize_pairs(PAIRS, tok, 128)
    ref = reference_logprobs(PairLogprobs(model, False), pairs, tok.pad_token_id, 4, torch.device("cpu"))
    want = reference_logprobs(PairLogprobs(base, False), pairs, tok.pad_token_id, 4, torch.device("cpu"), disable=False)
    policy = reference_logprobs(
        PairLogprobs(model, False), pairs, tok.pad_token_id, 4, torch.device("cpu"), disable=False
    )
    for i in ref:
        assert ref[i] == pytest.approx(want[i], abs=1e-4)
    assert any(abs(policy[i][0] - ref[i][0]) > 1e-3 for i in ref)


def test_dpo_steps_move_the_loss_and_precompute_matches(tmp_path, tiny_config):
    result = _quiet(train, _config(tiny_config, tmp_path, "live"))
    losses = _losses(tmp_path / "live")
    # fresh LoRA (B = 0): policy == reference, so the first loss is log 2
    assert losses[0] == pytest.approx(0.693147, abs=1e-4)
    assert losses[-1] < losses[0] and result.saved is not None
    _quiet(train, _config(tiny_config, tmp_path, "pre", precompute_ref=True))
    assert _losses(tmp_path / "pre") == pytest.approx(losses, abs=1e-4)


def test_ipo_runs(tmp_path, tiny_config):
    _quiet(train, _config(tiny_config, tmp_path, "ipo", loss_type="ipo", beta=0.1, max_steps=2))
    losses = _losses(tmp_path / "ipo")
    # IPO at the reference: (0 - 1/(2β))² = 25
    assert losses[0] == pytest.approx(25.0, abs=1e-3) and losses[1] < losses[0]


def test_full_finetuning_needs_precomputed_reference(tmp_path, tiny_config):
    with pytest.raises(ValueError, match="adapters disabled"):
        _quiet(train, _config(tiny_config, tmp_path, "f", finetune="full"))


def test_sft_coef_adds_the_chosen_mean_token_nll(tmp_path, tiny_config):
    from fastpeft.training.data import BatchPlan, collate
    from fastpeft.training.losses import CausalLMLoss

    coef = 0.5
    _quiet(train, _config(tiny_config, tmp_path, "rpo", sft_coef=coef, max_steps=1))
    tok = load_char_tokenizer()
    base = build_model(None, tiny_config, seed=0)  # the run's starting weights (fresh LoRA adds nothing)
    loss_fn = CausalLMLoss(base, "full")
    first = BatchPlan(list(range(len(PAIRS))), 4, seed=0).micro_batches(0)[0]  # the pairs of step 1
    pairs = tokenize_pairs([PAIRS[i] for i in first], tok, 128)
    nll = []
    with torch.no_grad():
        for pair in pairs:
            b = collate([pair.chosen], tok.pad_token_id)
            total, n = loss_fn(b["input_ids"], b["labels"], b["position_ids"], b["segment_ids"])
            nll.append(float(total) / int(n))
    assert _losses(tmp_path / "rpo")[0] == pytest.approx(0.693147 + coef * sum(nll) / len(nll), rel=1e-4)


def test_pairs_that_truncation_makes_identical_are_dropped():
    tok = load_char_tokenizer()
    pairs = [
        {
            "prompt": "Q: 1+1=?\nA:",
            "chosen": " long shared reasoning; answer 2",
            "rejected": " long shared reasoning; answer 3",
        },
        {"prompt": "Q: 2+2=?\nA:", "chosen": " 4", "rejected": " 5"},
    ]
    with pytest.warns(UserWarning, match="dropped 1 pairs whose chosen and rejected sides are the same"):
        kept = tokenize_pairs(pairs, tok, 24)  # cuts the first pair before its answers
    assert [p.index for p in kept] == [1]
