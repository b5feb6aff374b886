"""The training stages of the PRM evidence (:mod:`fastpeft.demo.prm_evidence`), each cached on disk.

1. ``base``: a tiny Llama fully fine-tuned on the hard tier (:mod:`fastpeft.demo.hard_tier`): the
   "pretrained" model whose NF4 quantization every adapter below shares.
2. ``policy``: a QLoRA SFT adapter on that NF4 base (what search samples from).
3. ``labels``: Math-Shepherd step labels of policy solutions on fresh prompts (``fastpeft
   step-labels``' builder) with the hard tier's checker; held-out solutions get checker labels only.
4. ``prm`` / ``orm``: the reward recipe with ``objective="process"`` (soft labels at every step
   boundary) and ``"outcome"`` (the outcome of every full response the labelling produced: the
   solutions and their rollouts), each a QLoRA adapter + scalar head on the same base.
5. ``roles``: the swarm's decomposer / integrator and the single-agent adapter (QLoRA SFT).

A stage is skipped when its directory holds a ``stage.json`` written with the same settings, so a
rerun (or a crash) only redoes what changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastpeft.demo.hard_tier import make_hard_dataset
from fastpeft.demo.swarm_task import decomposer_records, integrator_records, make_multipart_dataset

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 112,
    "max_position_embeddings": 192,
    "tie_word_embeddings": False,
}
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}


@dataclasses.dataclass
class StageSettings:
    seed: int = 0
    model_config: dict = dataclasses.field(default_factory=lambda: dict(TINY_LLAMA))
    sft_problems: int = 6000
    base_steps: int = 2400
    base_lr: float = 4e-3
    policy_steps: int = 150
    policy_lr: float = 1e-3
    label_prompts: int = 1200
    heldout_prompts: int = 150
    heldout_samples: int = 8
    rollouts: int = 4
    temperature: float = 0.8
    max_new_tokens: int = 170
    rm_steps: int = 800
    rm_lr: float = 1e-3
    rm_batch: int = 16
    role_steps: dict = dataclasses.field(default_factory=lambda: {"decomposer": 100, "integrator": 300, "single": 600})
    role_lr: float = 2e-3
    role_problems: int = 2000
    batch: int = 32

    @classmethod
    def quick(cls) -> StageSettings:
        tiny = {
            **TINY_LLAMA,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        }
        return cls(
            model_config=tiny,
            sft_problems=128,
            base_steps=20,
            policy_steps=2,
            label_prompts=4,
            heldout_prompts=3,
            heldout_samples=2,
            rollouts=2,
            max_new_tokens=48,
            rm_steps=2,
            rm_batch=4,
            role_steps={"decomposer": 2, "integrator": 2, "single": 2},
            role_problems=32,
            batch=8,
        )


def _quiet(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def cached(directory: Path, settings: dict[str, Any], build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``build()`` once per ``settings``: its summary is kept in ``directory/stage.json``."""
    marker = directory / "stage.json"
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("settings") == settings:
            return saved["summary"]
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = build()
    summary["seconds"] = time.perf_counter() - start
    marker.write_text(json.dumps({"settings": settings, "summary": summary}, indent=1, default=str))
    return summary


def splits(s: StageSettings, val: int, test: int) -> dict[str, list[dict[str, str]]]:
    """Disjoint problem sets: SFT, labelling, held-out labels, validation (allocation) and test."""
    out: dict[str, list[dict[str, str]]] = {}
    seen: set[str] = set()
    sizes = {"sft": s.sft_problems, "labels": s.label_prompts, "heldout": s.heldout_prompts, "val": val, "test": test}
    for i, (name, n) in enumerate(sizes.items()):
        out[name] = make_hard_dataset(n, seed=s.seed + 101 * i, exclude=seen)
        seen |= {r["prompt"] for r in out[name]}
    return out


def _sft(out: Path, s: StageSettings, data: list[dict], steps: int, lr: float, **kw: Any) -> dict[str, Any]:
    from fastpeft.training import sft

    result = _quiet(
        sft.train,
        sft.SFTConfig(
            train_data=data,
            max_steps=steps,
            lr=lr,
            micro_batch_size=s.batch,
            warmup_steps=min(20, steps // 4),
            scheduler="cosine",
            max_seq_len=int(s.model_config["max_position_embeddings"]),
            output_dir=str(out),
            log_every=50,
            seed=s.seed,
            progress=False,
            device="cpu",
            plot=False,
            **kw,
        ),
    )
    return {"saved": str(result.saved), "final_loss": result.final_loss, "steps": result.steps}


def train_base(root: Path, s: StageSettings, data: dict) -> dict[str, Any]:
    settings = {
        "model_config": s.model_config,
        "problems": s.sft_problems,
        "steps": s.base_steps,
        "lr": s.base_lr,
        "seed": s.seed,
        "batch": s.batch,
    }
    return cached(
        root / "base",
        settings,
        lambda: _sft(
            root / "base", s, data["sft"], s.base_steps, s.base_lr, model_config=s.model_config, finetune="full"
        ),
    )


def train_policy(root: Path, s: StageSettings, data: dict, base: str) -> dict[str, Any]:
    settings = {"base": base, "steps": s.policy_steps, "lr": s.policy_lr, "lora": LORA}
    return cached(
        root / "policy",
        settings,
        lambda: _sft(
            root / "policy", s, data["sft"], s.policy_steps, s.policy_lr, model=base, finetune="qlora", lora=LORA
        ),
    )


def build_labels(root: Path, s: StageSettings, data: dict, generator: Any) -> dict[str, Any]:
    """Monte Carlo + checker labels on the labelling prompts; checker-only labels on held-out ones."""
    from fastpeft.training.step_labels import StepLabelConfig, build_step_labels

    checker = "fastpeft.demo.hard_tier:check_steps"
    common = {
        "temperature": s.temperature,
        "max_new_tokens": s.max_new_tokens,
        "checker": checker,
        "seed": s.seed,
        "progress": False,
    }
    train_cfg = StepLabelConfig(
        output=str(root / "labels" / "train.jsonl"), rollouts=s.rollouts, keep_rollouts=True, **common
    )
    held_cfg = StepLabelConfig(
        output=str(root / "labels" / "heldout.jsonl"),
        rollouts=0,
        samples_per_prompt=s.heldout_samples,
        **{**common, "seed": s.seed + 7},
    )

    def build() -> dict[str, Any]:
        return {
            "train": build_step_labels(train_cfg, generator, data["labels"]),
            "heldout": build_step_labels(held_cfg, generator, data["heldout"]),
        }

    settings = {
        "train": dataclasses.asdict(train_cfg),
        "heldout": dataclasses.asdict(held_cfg),
        "prompts": [s.label_prompts, s.heldout_prompts],
    }
    return cached(root / "labels", settings, build)


def train_reward(
    root: Path, s: StageSettings, base: str, name: str, objective: str, records: list[dict], label_key: str = "soft"
) -> dict[str, Any]:
    from fastpeft.training import reward_model

    def build() -> dict[str, Any]:
        result = _quiet(
            reward_model.train,
            reward_model.RewardConfig(
                model=base,
                finetune="qlora",
                lora=LORA,
                objective=objective,
                label_key=label_key,
                train_data=records,
                max_steps=s.rm_steps,
                lr=s.rm_lr,
                micro_batch_size=s.rm_batch,
                warmup_steps=min(20, s.rm_steps // 4),
                scheduler="cosine",
                max_seq_len=int(s.model_config["max_position_embeddings"]),
                output_dir=str(root / name),
                seed=s.seed,
                log_every=50,
                progress=False,
                device="cpu",
                plot=False,
            ),
        )
        return {"saved": str(result.saved), "final_loss": result.final_loss, "records": len(records)}

    settings = {
        "base": base,
        "objective": objective,
        "label_key": label_key,
        "steps": s.rm_steps,
        "lr": s.rm_lr,
        "batch": s.rm_batch,
        "records": len(records),
        "lora": LORA,
    }
    return cached(root / name, settings, build)


def train_roles(root: Path, s: StageSettings, base: str) -> dict[str, Any]:
    """The swarm's decomposer and integrator and the single agent: QLoRA SFT adapters on the base."""
    problems = make_multipart_dataset(s.role_problems, seed=s.seed + 5)
    data = {"decomposer": decomposer_records(problems), "integrator": integrator_records(problems), "single": problems}
    out = {}
    for role, records in data.items():
        steps = s.role_steps[role]
        settings = {"base": base, "steps": steps, "lr": s.role_lr, "problems": s.role_problems, "lora": LORA}
        out[role] = cached(
            root / "roles" / role,
            settings,
            lambda r=role, d=records, n=steps: _sft(
                root / "roles" / r, s, d, n, s.role_lr, model=base, finetune="qlora", lora=LORA
            ),
        )
    return out
