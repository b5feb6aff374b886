"""Real transformers.Trainer, trl.SFTTrainer, trl.DPOTrainer and trl.GRPOTrainer runs on tiny Llamas
through both ways in: a PEFT model after fastpeft.patch_peft_model ("peft"), and a fastpeft-injected
model ("native"; handed to DPO/GRPO through fastpeft.as_peft_model). Loss falls, the fused op runs,
checkpoints are written and resume, the saved result reloads with identical logits, and DPO/GRPO use
the adapter-disabled model as the reference (no second model in memory)."""

from __future__ import annotations

import gc
import math

import pytest
import torch

import fastpeft
from fastpeft import LoraConfig, inject

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

PATHS = ("native", "peft")
TEXTS = ["abcabcabcabc abc abc", "abc abcabc abcabc ab", "cabcab cabcab cabca", "bcabca bcabca bcab"] * 4


def build(kit, path: str, *, for_trl: bool = False, base=None):
    model = base if base is not None else kit.tiny_llama()
    if path == "native":
        inject(model, LoraConfig(r=4, lora_alpha=16, target_modules=kit.LLAMA_LINEARS))
        return fastpeft.as_peft_model(model) if for_trl else model
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=kit.LLAMA_LINEARS, task_type="CAUSAL_LM")
    return fastpeft.patch_peft_model(peft.get_peft_model(model, config))


def reload(kit, path: str, directory, base=None):
    base = base if base is not None else kit.tiny_llama()
    if path == "native":
        return fastpeft.load_adapter(base, directory)  # the documented call
    return fastpeft.patch_peft_model(peft.PeftModel.from_pretrained(base, directory))


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def run_args(directory, steps: int = 4, **kw) -> dict:
    return dict(
        output_dir=str(directory),
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        bf16=False,
        **kw,
    )


def assert_checkpoint(directory, step: int) -> None:
    files = {p.name for p in (directory / f"checkpoint-{step}").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files


def only_one_llama(model) -> bool:
    """No second LlamaForCausalLM (a reference copy) alive besides ``model``'s."""
    from transformers import LlamaForCausalLM

    gc.collect()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [o is inner for o in gc.get_objects() if isinstance(o, LlamaForCausalLM)] == [True]


def check_resume_and_reload(kit, path, trainer_cls, make_args, tmp_path, make_model, base=None, **trainer_kw) -> None:
    """Resume a fresh model (``make_model()``) from checkpoint-2 to the end: the same adapter as the
    uninterrupted run; then reload the final save and compare logits."""
    model = trainer_kw.pop("model")
    final = trainable(model)
    resumed = make_model()
    trainer = trainer_cls(model=resumed, args=make_args(tmp_path / "resumed"), **trainer_kw)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    got = trainable(resumed)
    assert got.keys() == final.keys()
    for name, want in final.items():
        # SFTTrainer casts a quantized model's LoRA weights to bf16; PEFT's resume reloads them in fp32
        tol = 2e-2 if torch.bfloat16 in (want.dtype, got[name].dtype) else 1e-6
        torch.testing.assert_close(
            got[name].float(), want.float(), atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )
    trainer.save_model(str(tmp_path / "final"))
    ids = kit.token_ids()
    reloaded = reload(kit, path, tmp_path / "final", base=base() if base else None)
    torch.testing.assert_close(logits(reloaded, ids), logits(resumed, ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_transformers_trainer(peft_kit, char_tokenizer, tmp_path, path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    enc = char_tokenizer(TEXTS, padding="max_length", max_length=24, truncation=True)
    data = datasets.Dataset.from_dict({**enc, "labels": enc["input_ids"]})

    def make_args(directory):
        return TrainingArguments(**run_args(directory), learning_rate=1e-2)

    model = build(peft_kit, path)
    trainer = Trainer(
        model=model, args=make_args(tmp_path / "run"), train_dataset=data, data_collator=default_data_collator
    )
    assert peft_kit.fused_op_calls(trainer.train) >= 4 * 14  # every LoRA layer, every step, fused
    history = losses(trainer)
    assert len(history) == 4 and history[-1] < history[0]
    assert_checkpoint(tmp_path / "run", 2)
    check_resume_and_reload(
        peft_kit,
        path,
        Trainer,
        make_args,
        tmp_path,
        lambda: build(peft_kit, path),
        model=model,
        train_dataset=data,
        data_collator=default_data_collator,
    )


@pytest.mark.parametrize("path", [*PATHS, "peft_nf4"])
def test_sft_trainer(peft_kit, char_tokenizer, tmp_path, path):
    data = datasets.Dataset.from_dict({"text": TEXTS})
    base = None
    if path == "peft_nf4":  # QLoRA as users run it: bitsandbytes NF4 base, PEFT LoRA, patched
        peft_kit.tiny_llama().save_pretrained(tmp_path / "base")

        def base():
            return peft_kit.load_4bit(tmp_path / "base", double_quant=True)

    way = "peft" if path == "peft_nf4" else path

    def make_args(directory):
        return trl.SFTConfig(**run_args(directory), learning_rate=1e-2, max_length=24)

    model = build(peft_kit, way, base=base() if base else None)
    trainer = trl.SFTTrainer(
        model=model, args=make_args(tmp_path / "run"), train_dataset=data, processing_class=char_tokenizer
    )
    assert peft_kit.fused_op_calls(trainer.train) >= 4 * 14
    history = losses(trainer)
    assert len(history) == 4 and history[-1] < history[0]
    assert_checkpoint(tmp_path / "run", 2)
    check_resume_and_reload(
        peft_kit,
        way,
        trl.SFTTrainer,
        make_args,
        tmp_path,
        lambda: build(peft_kit, way, base=base() if base else None),
        base=base,
        model=model,
        train_dataset=data,
        processing_class=char_tokenizer,
    )


@pytest.mark.parametrize("path", PATHS)
def test_dpo_trainer_uses_the_adapter_disabled_model_as_reference(peft_kit, char_tokenizer, tmp_path, path):
    data = datasets.Dataset.from_dict(
        {"prompt": ["ab", "cd", "ef", "gh"] * 2, "chosen": [" yes"] * 8, "rejected": [" no!"] * 8}
    )

    def make_args(directory):
        return trl.DPOConfig(**run_args(directory), learning_rate=1e-2, max_length=16)

    model = build(peft_kit, path, for_trl=True)
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=None,
        args=make_args(tmp_path / "run"),
        train_dataset=data,
        processing_class=char_tokenizer,
    )
    assert trainer.ref_model is None and only_one_llama(model)
    assert peft_kit.fused_op_calls(trainer.train) >= 4 * 14
    history = losses(trainer)
    assert abs(history[0] - math.log(2)) < 1e-6  # policy == reference at step 1: -log σ(0)
    assert history[-1] < history[0] and only_one_llama(model)
    assert_checkpoint(tmp_path / "run", 2)
    check_resume_and_reload(
        peft_kit,
        path,
        trl.DPOTrainer,
        make_args,
        tmp_path,
        lambda: build(peft_kit, path, for_trl=True),
        model=model,
        ref_model=None,
        train_dataset=data,
        processing_class=char_tokenizer,
    )


def reward_letter_a(completions, **kwargs) -> list[float]:
    return [float(c.count("a")) for c in completions]


@pytest.mark.parametrize("path", PATHS)
def test_grpo_trainer_uses_the_adapter_disabled_model_as_reference(peft_kit, char_tokenizer, tmp_path, path):
    """GRPO's loss is ~0 on-policy, so the checks are the reference (KL exactly 0 while the policy
    equals the base, then > 0), the adapter moving, checkpoints, resume and reload."""
    data = datasets.Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"] * 2})

    def make_args(directory, steps=3):
        return trl.GRPOConfig(
            **run_args(directory, steps), learning_rate=1e-2, num_generations=4, max_completion_length=6, beta=0.1
        )

    model = build(peft_kit, path, for_trl=True)
    before = trainable(model)
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward_letter_a,
        args=make_args(tmp_path / "run"),
        train_dataset=data,
        processing_class=char_tokenizer,
    )
    assert trainer.ref_model is None and only_one_llama(model)
    assert peft_kit.fused_op_calls(trainer.train) >= 3 * 14
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kls[0] == 0.0 and kls[-1] > 0.0 and only_one_llama(model)
    after = trainable(model)
    assert any(not torch.equal(after[n], before[n]) for n in before)
    assert_checkpoint(tmp_path / "run", 2)
    resumed = build(peft_kit, path, for_trl=True)
    trainer = trl.GRPOTrainer(
        model=resumed,
        reward_funcs=reward_letter_a,
        args=make_args(tmp_path / "resumed"),
        train_dataset=data,
        processing_class=char_tokenizer,
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert trainer.state.global_step == 3
    trainer.save_model(str(tmp_path / "final"))
    ids = peft_kit.token_ids()
    torch.testing.assert_close(
        logits(reload(peft_kit, path, tmp_path / "final"), ids), logits(resumed, ids), atol=1e-6, rtol=1e-6
    )
