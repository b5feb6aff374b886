"""GRPO with the PRM's step rewards against GRPO with outcome reward: same task, policy, budget.

Both runs start from the policy (the SFT adapter merged into the base, which is then the frozen
KL reference) with a fresh QLoRA adapter, sample the same number of prompts x generations per
step for the same number of steps at the same temperature, and evaluate greedy exact match on the
same held-out problems every ``eval_every`` steps. The outcome run's reward is the exact final
answer; the process run's per-token advantages come from the PRM's step scores
(:class:`~fastpeft.training.process_supervision.ProcessSupervisionReward`), with the exact answer
logged beside them (never trained on) so both curves share a y-axis.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastpeft.demo.prm_stages import LORA, StageSettings, _quiet, cached


def _curve(history: list[dict[str, Any]], final: dict[str, Any], steps: int) -> tuple[list, dict]:
    points = [(h["step"], h["exact_match"]) for h in history if "exact_match" in h]
    if final.get("exact_match") is not None:
        points = [p for p in points if p[0] != steps] + [(steps, final["exact_match"])]
    n = final.get("eval_n") or 1
    return points, {str(s): math.sqrt(v * (1 - v) / n) for s, v in points}


def compare(
    root: Path, st: StageSettings, g: dict[str, Any], data: dict, base: str, policy: str, prm_dir: str
) -> dict[str, Any]:
    from fastpeft.training import grpo
    from fastpeft.training.model_setup import load_saved_model
    from fastpeft.training.process_supervision import ProcessSupervisionReward
    from fastpeft.training.rewards import arithmetic_reward
    from fastpeft.training.step_reward_model import load_step_scorer

    max_len = int(st.model_config["max_position_embeddings"])
    common = dict(
        model=base,
        init_adapter=policy,
        finetune="qlora",
        lora=LORA,
        train_data=data["sft"],
        eval_data=data["test"][: g["eval_problems"]],
        eval_max_examples=None,
        max_steps=g["steps"],
        lr=g["lr"],
        beta=g["beta"],
        temperature=st.temperature,
        prompts_per_step=g["prompts"],
        num_generations=g["generations"],
        max_new_tokens=st.max_new_tokens,
        max_seq_len=max_len,
        micro_batch_size=32,
        eval_every=g["eval_every"],
        seed=st.seed,
        log_every=1,
        progress=False,
        device="cpu",
        plot=False,
    )
    runs = {}
    for name in ("outcome reward", "PRM step rewards"):
        out = root / "grpo" / name.split()[0].lower()

        def build(name: str = name, out: Path = out) -> dict[str, Any]:
            reward = None
            rewards = {"arithmetic": 1.0}
            if name.startswith("PRM"):
                lm, tok = load_saved_model(base)
                prm = load_step_scorer(lm, prm_dir, tok, "prm", max_seq_len=max_len)
                reward = ProcessSupervisionReward(prm, tok, monitor={"arithmetic": arithmetic_reward})
            result = _quiet(grpo.train, grpo.GRPOConfig(output_dir=str(out), rewards=rewards, **common), reward=reward)
            curve, se = _curve(result.history, result.eval, result.steps)
            history = [
                {
                    "step": h["step"],
                    "outcome_rate": h.get("reward_arithmetic"),
                    "reward_mean": h.get("reward_mean"),
                    "kl": h.get("kl"),
                }
                for h in result.history
                if "loss" in h
            ]
            return {"exact_match_curve": curve, "se": se, "history": history, "train_seconds": result.train_seconds}

        runs[name] = cached(
            out,
            {
                "common": {k: v for k, v in common.items() if k not in ("train_data", "eval_data")},
                "name": name,
                "prm": prm_dir if name.startswith("PRM") else None,
            },
            build,
        )
    return {"runs": runs, "settings": g}
