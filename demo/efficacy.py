"""Efficacy of the preference / RL recipes on the bundled arithmetic task, small enough for a CPU.

    python -m fastpeft.demo.efficacy [--output-dir runs/efficacy] [--seed 0] [--quick]

Pipeline (every stage is the library's own recipe, run through its public ``train``):

1. **SFT** a tiny Llama (from a config, full fine-tuning) on 2-digit additions with worked steps,
   stopped early on purpose so the checkpoint leaves room to improve (greedy exact match 0.70 on the
   held-out problems with the defaults).
2. **GRPO** (LoRA on the SFT checkpoint, outcome reward = exact final answer, KL to the
   adapter-disabled SFT policy): exact match before / after on the same held-out problems.
   **PPO** likewise (LoRA + value head, GAE, per-token KL penalty), from the same checkpoint.
3. **Pairs from sampled answers**: the SFT model samples several answers per prompt; prompts with
   at least one right and one wrong answer give (right, wrong) pairs — training pairs from training
   prompts, held-out pairs from held-out prompts.
4. **Reward model** (LoRA + scalar head, Bradley-Terry) on the training pairs: pairwise accuracy on
   the held-out pairs.
5. **DPO** (LoRA, reference = adapters disabled, plus the chosen-NLL term ``sft_coef``) on the
   training pairs: exact match before / after; repeated with ``sft_coef=0`` (plain DPO) as an
   ablation, which shows the likelihood displacement the NLL term prevents.

Results go to ``<output-dir>/efficacy.json`` (and stdout) with timings, device and versions.
``--quick`` shrinks every stage to a smoke test (numbers meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import random
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fastpeft.demo.arithmetic import make_arithmetic_dataset
from fastpeft.reasoning.answers import is_correct
from fastpeft.training.model_setup import load_saved_model

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 112,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


@dataclasses.dataclass
class EfficacySettings:
    seed: int = 0
    train_problems: int = 2000
    test_problems: int = 200
    max_new_tokens: int = 80
    sft_steps: int = 200
    sft_lr: float = 3e-3
    grpo_steps: int = 200
    grpo_lr: float = 2e-4
    grpo_beta: float = 0.02
    grpo_temperature: float = 0.3  # samples near the greedy answer: the one exact match judges
    grpo_prompts_per_step: int = 16
    grpo_generations: int = 8
    ppo_steps: int = 100  # PPO shares GRPO's temperature, prompts per step and samples per prompt
    ppo_lr: float = 2e-4
    ppo_kl_coef: float = 0.02
    pair_prompts: int = 1000
    pair_eval_prompts: int = 200
    pair_samples: int = 8
    pair_temperature: float = 0.4  # near-greedy samples: right and wrong answers differ where it matters
    rm_steps: int = 100
    rm_lr: float = 5e-4
    dpo_steps: int = 80
    dpo_lr: float = 5e-5
    dpo_beta: float = 0.1
    dpo_sft_coef: float = 1.0  # RPO term; the run is repeated with 0 as an ablation
    lora: dict = dataclasses.field(default_factory=lambda: {"r": 16, "lora_alpha": 32})

    @classmethod
    def quick(cls) -> EfficacySettings:
        return cls(
            train_problems=256,
            test_problems=16,
            sft_steps=120,
            grpo_steps=2,
            grpo_prompts_per_step=2,
            grpo_generations=2,
            ppo_steps=2,
            pair_prompts=128,
            pair_eval_prompts=16,
            rm_steps=2,
            dpo_steps=2,
        )


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def greedy_exact_match(model: Any, tokenizer: Any, records: list[dict], max_new_tokens: int) -> float:
    from fastpeft.training.evaluate import exact_match

    return float(
        exact_match(model, tokenizer, records, "answer", max_new_tokens, 100, torch.device("cpu"))["exact_match"]
    )


def sample_pairs(
    model: Any, tokenizer: Any, records: list[dict], samples: int, temperature: float, max_new_tokens: int, seed: int
) -> tuple[list[dict], dict[str, float]]:
    """(right, wrong) answer pairs sampled from ``model``: one pair per prompt that got both."""
    from fastpeft.reasoning.sampler import Sampler
    from fastpeft.reasoning.types import SamplingParams

    sampler = Sampler(model, tokenizer, max_seq_len=128)
    rng = random.Random(seed)
    pairs, n_right, n_total = [], 0, 0
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + start)
        groups = sampler.generate([r["prompt"] for r in chunk], params, samples)
        for rec, group in zip(chunk, groups):
            right = [c.text for c in group if is_correct(c.text, rec["answer"])]
            wrong = [c.text for c in group if not is_correct(c.text, rec["answer"])]
            n_right, n_total = n_right + len(right), n_total + len(group)
            if right and wrong:
                pairs.append(
                    {
                        "prompt": rec["prompt"],
                        "chosen": rng.choice(right),
                        "rejected": rng.choice(wrong),
                        "answer": rec["answer"],
                    }
                )
    return pairs, {"sampled_accuracy": n_right / max(n_total, 1), "prompts": len(records), "pairs": len(pairs)}


def run_efficacy(output_dir: str | Path = "runs/efficacy", settings: EfficacySettings | None = None) -> dict[str, Any]:
    """Run the whole pipeline (module docstring); returns and writes the results."""
    from fastpeft.training import dpo, grpo, ppo, reward_model, sft

    s = settings or EfficacySettings()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    train = make_arithmetic_dataset(s.train_problems, seed=s.seed)
    test = make_arithmetic_dataset(s.test_problems, seed=s.seed + 1, exclude={r["prompt"] for r in train})
    results: dict[str, Any] = {"settings": dataclasses.asdict(s), "model_config": TINY_LLAMA}
    common = {"progress": False, "device": "cpu"}

    t = time.perf_counter()
    sft_result = _quiet(
        sft.train,
        sft.SFTConfig(
            model_config=TINY_LLAMA,
            finetune="full",
            train_data=train,
            max_steps=s.sft_steps,
            lr=s.sft_lr,
            micro_batch_size=32,
            warmup_steps=min(20, s.sft_steps // 4),
            scheduler="cosine",
            max_seq_len=96,
            output_dir=str(out / "sft"),
            log_every=50,
            seed=s.seed,
            **common,
        ),
    )
    sft_dir = Path(sft_result.saved)
    model, tok = load_saved_model(sft_dir)
    em_sft = greedy_exact_match(model, tok, test, s.max_new_tokens)
    results["sft"] = {
        "exact_match": em_sft,
        "steps": s.sft_steps,
        "final_loss": sft_result.final_loss,
        "seconds": time.perf_counter() - t,
    }

    t = time.perf_counter()
    g = _quiet(
        grpo.train,
        grpo.GRPOConfig(
            model=str(sft_dir),
            train_data=train,
            eval_data=test,
            eval_max_examples=None,
            max_steps=s.grpo_steps,
            lr=s.grpo_lr,
            beta=s.grpo_beta,
            temperature=s.grpo_temperature,
            prompts_per_step=s.grpo_prompts_per_step,
            num_generations=s.grpo_generations,
            max_new_tokens=s.max_new_tokens,
            max_seq_len=128,
            micro_batch_size=32,
            lora=s.lora,
            rewards={"answer": 1.0},
            eval_match="answer",
            scheduler="constant",
            output_dir=str(out / "grpo"),
            seed=s.seed,
            log_every=5,
            eval_every=max(1, s.grpo_steps // 4),
            **common,
        ),
    )
    curve = [(h["step"], h["exact_match"]) for h in g.history if "exact_match" in h]
    results["grpo"] = {
        "exact_match_before": curve[0][1],
        "exact_match_after": g.eval["exact_match"],
        "exact_match_curve": curve + [(g.steps, g.eval["exact_match"])],
        "steps": g.steps,
        "reward_first_5": _mean([h.get("reward_mean") for h in g.history[1:6]]),
        "reward_last_5": _mean([h.get("reward_mean") for h in g.history[-5:]]),
        "seconds": time.perf_counter() - t,
    }

    t = time.perf_counter()
    p = _quiet(
        ppo.train,
        ppo.PPOConfig(
            model=str(sft_dir),
            train_data=train,
            eval_data=test,
            eval_max_examples=None,
            max_steps=s.ppo_steps,
            lr=s.ppo_lr,
            kl_coef=s.ppo_kl_coef,
            temperature=s.grpo_temperature,
            prompts_per_step=s.grpo_prompts_per_step,
            samples_per_prompt=s.grpo_generations,
            max_new_tokens=s.max_new_tokens,
            max_seq_len=128,
            mini_batch_size=32,
            ppo_epochs=1,
            lora=s.lora,
            rewards={"answer": 1.0},
            eval_match="answer",
            scheduler="constant",
            output_dir=str(out / "ppo"),
            seed=s.seed,
            log_every=10,
            eval_every=max(1, s.ppo_steps // 2),
            **common,
        ),
    )
    curve = [(h["step"], h["exact_match"]) for h in p.history if "exact_match" in h]
    results["ppo"] = {
        "exact_match_before": curve[0][1],
        "exact_match_after": p.eval["exact_match"],
        "exact_match_curve": curve + [(p.steps, p.eval["exact_match"])],
        "steps": p.steps,
        "seconds": time.perf_counter() - t,
    }

    t = time.perf_counter()
    pair_prompts = train[: s.pair_prompts]
    train_pairs, train_stats = sample_pairs(
        model, tok, pair_prompts, s.pair_samples, s.pair_temperature, s.max_new_tokens, s.seed
    )
    eval_pairs, eval_stats = sample_pairs(
        model, tok, test[: s.pair_eval_prompts], s.pair_samples, s.pair_temperature, s.max_new_tokens, s.seed + 7
    )
    results["pairs"] = {"train": train_stats, "held_out": eval_stats, "seconds": time.perf_counter() - t}
    (out / "pairs_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in train_pairs))
    (out / "pairs_held_out.jsonl").write_text("".join(json.dumps(p) + "\n" for p in eval_pairs))

    t = time.perf_counter()
    rm = _quiet(
        reward_model.train,
        reward_model.RewardConfig(
            model=str(sft_dir),
            train_data=train_pairs,
            eval_data=eval_pairs,
            max_steps=s.rm_steps,
            lr=s.rm_lr,
            micro_batch_size=16,
            max_seq_len=128,
            lora=s.lora,
            scheduler="constant",
            output_dir=str(out / "reward"),
            seed=s.seed,
            log_every=25,
            **common,
        ),
    )
    results["reward_model"] = {
        "pairwise_accuracy_held_out": rm.eval.get("eval_accuracy"),
        "held_out_pairs": rm.eval.get("eval_pairs"),
        "train_pairs": len(train_pairs),
        "steps": rm.steps,
        "seconds": time.perf_counter() - t,
    }

    import fastpeft

    for name, sft_coef in (("dpo", s.dpo_sft_coef), ("dpo_plain", 0.0)):
        t = time.perf_counter()
        d = _quiet(
            dpo.train,
            dpo.DPOConfig(
                model=str(sft_dir),
                train_data=train_pairs,
                eval_data=eval_pairs,
                max_steps=s.dpo_steps,
                lr=s.dpo_lr,
                beta=s.dpo_beta,
                sft_coef=sft_coef,
                micro_batch_size=8,
                max_seq_len=128,
                lora=s.lora,
                scheduler="constant",
                output_dir=str(out / name),
                seed=s.seed,
                log_every=10,
                **common,
            ),
        )
        policy, _ = load_saved_model(sft_dir)
        fastpeft.load_adapter(policy, d.saved)
        results[name] = {
            "exact_match_before": em_sft,
            "sft_coef": sft_coef,
            "exact_match_after": greedy_exact_match(policy, tok, test, s.max_new_tokens),
            "held_out_reward_accuracy": d.eval.get("eval_reward_accuracy"),
            "steps": d.steps,
            "seconds": time.perf_counter() - t,
        }
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["environment"] = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": now,
    }
    (out / "efficacy.json").write_text(json.dumps(results, indent=2))
    return results


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpeft.demo.efficacy", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/efficacy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (numbers are meaningless)")
    args = parser.parse_args(argv)
    settings = EfficacySettings.quick() if args.quick else EfficacySettings()
    settings.seed = args.seed
    results = run_efficacy(args.output_dir, settings)
    summary = {
        "sft_exact_match": results["sft"]["exact_match"],
        "grpo_exact_match": [results["grpo"]["exact_match_before"], results["grpo"]["exact_match_after"]],
        "reward_model_pairwise_accuracy": results["reward_model"]["pairwise_accuracy_held_out"],
        "ppo_exact_match": [results["ppo"]["exact_match_before"], results["ppo"]["exact_match_after"]],
        "dpo_exact_match": [results["dpo"]["exact_match_before"], results["dpo"]["exact_match_after"]],
        "dpo_plain_exact_match": [
            results["dpo_plain"]["exact_match_before"],
            results["dpo_plain"]["exact_match_after"],
        ],
    }
    print(json.dumps(summary, indent=2))
    print(f"full results: {Path(args.output_dir) / 'efficacy.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
