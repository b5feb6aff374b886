"""Learned process rewards and search that beats best-of-N at equal compute: the evidence command.

    python -m fastpeft.demo.prm_evidence --out runs/prm_evidence [--seed 0] [--threads 1] [--small | --quick]

Deterministic in ``--seed``; every stage is cached under ``--out`` (a rerun redoes only what
changed). On the hard tier (:mod:`fastpeft.demo.hard_tier`), with one NF4 base in memory and every
role an adapter on it (:mod:`fastpeft.demo.prm_stages`):

1. step labels (Math-Shepherd rollouts + checker), a PRM and an ORM trained by the reward recipe;
   their held-out step / outcome / pairwise accuracy;
2. search on a validation and a test split at 256-4096 tokens per problem
   (:mod:`fastpeft.demo.prm_search_eval`): best-of-N with the ORM / PRM / an oracle, weighted
   best-of-N, majority vote, beam search with the PRM, today's fixed-threshold allocation;
3. compute-optimal allocation fitted on the validation split (difficulty = 1 - the PRM's value of
   the bare question, 4 bins) and applied to the test split, by table and live;
4. GRPO with the PRM's step rewards against outcome reward (:mod:`fastpeft.demo.prm_grpo`);
5. the swarm against a single agent on the multi-part task (:mod:`fastpeft.demo.prm_swarm`);
6. the PRM scoring in the policy's batch against separate passes (:mod:`fastpeft.demo.prm_shared_batch`).

Outputs in ``--out``: ``evidence.json`` (every number, per-problem outcomes, settings,
environment), ``evidence.md`` (the tables and the targets) and ``evidence.png`` (accuracy vs
compute). ``--quick`` runs every stage at toy size in well under a minute (numbers meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastpeft.demo import prm_report, prm_stages
from fastpeft.demo.prm_search_eval import SamplePool, run_configs, search_configs
from fastpeft.demo.prm_stages import StageSettings


@dataclasses.dataclass
class EvidenceSettings:
    stages: StageSettings = dataclasses.field(default_factory=StageSettings)
    val_problems: int = 100
    test_problems: int = 100
    budgets: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    step_tokens: int = 28  # the longest step, "8*7+1=57 write 7 carry 5; ", is 26 characters
    max_steps: int = 8  # a hard-tier solution has at most 7 steps
    bins: int = 4
    grpo: dict = dataclasses.field(
        default_factory=lambda: {
            "steps": 30,
            "prompts": 8,
            "generations": 8,
            "lr": 2e-4,
            "beta": 0.02,
            "eval_every": 10,
            "eval_problems": 100,
        }
    )
    swarm_problems: int = 100
    shared_batch_problems: int = 20

    @classmethod
    def small(cls) -> EvidenceSettings:
        """The trained stages at full size, search and RL on fewer problems and budgets (about half an
        hour on two busy CPU cores instead of several hours)."""
        return cls(
            val_problems=30,
            test_problems=30,
            budgets=(256, 1024, 4096),
            grpo={
                "steps": 10,
                "prompts": 8,
                "generations": 8,
                "lr": 2e-4,
                "beta": 0.02,
                "eval_every": 5,
                "eval_problems": 30,
            },
            swarm_problems=30,
            shared_batch_problems=5,
        )

    @classmethod
    def quick(cls) -> EvidenceSettings:
        return cls(
            stages=StageSettings.quick(),
            val_problems=3,
            test_problems=3,
            budgets=(128, 256),
            bins=2,
            grpo={
                "steps": 1,
                "prompts": 2,
                "generations": 2,
                "lr": 2e-4,
                "beta": 0.02,
                "eval_every": 1,
                "eval_problems": 2,
            },
            swarm_problems=2,
            shared_batch_problems=2,
        )


def shared_model(base: str, policy: str) -> tuple[Any, Any]:
    """The one model in memory: the base quantized to NF4 with the policy adapter (active)."""
    import fastpeft
    from fastpeft.training.model_setup import load_saved_model

    model, tokenizer = load_saved_model(base)
    fastpeft.load_adapter(model, policy, adapter_name="policy", quantize="nf4")
    return model.eval(), tokenizer


def run(out_dir: str | Path, s: EvidenceSettings | None = None, progress: bool = True) -> dict[str, Any]:
    """Every stage (module docstring); returns and writes the results."""
    from fastpeft.reasoning.answers import is_correct
    from fastpeft.reasoning.sampler import Sampler
    from fastpeft.reasoning.types import SamplingParams
    from fastpeft.reasoning.verifiers import CallableScorer
    from fastpeft.training.data import load_records
    from fastpeft.training.step_labels import outcome_records
    from fastpeft.training.step_reward_model import evaluate_labels, load_step_scorer, tokenize_label_records

    s = s or EvidenceSettings()
    st = s.stages
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(st.seed)
    t0 = time.perf_counter()
    data = prm_stages.splits(st, s.val_problems, s.test_problems)
    stages: dict[str, Any] = {"base": prm_stages.train_base(root, st, data)}
    base = stages["base"]["saved"]
    stages["policy"] = prm_stages.train_policy(root, st, data, base)
    model, tok = shared_model(base, stages["policy"]["saved"])
    max_len = int(st.model_config["max_position_embeddings"])
    sampler = Sampler(model, tok, max_seq_len=max_len)
    stages["labels"] = prm_stages.build_labels(root, st, data, sampler)
    train_labels = load_records(str(root / "labels" / "train.jsonl"))
    heldout = load_records(str(root / "labels" / "heldout.jsonl"))
    stages["prm"] = prm_stages.train_reward(root, st, base, "prm", "process", train_labels)
    stages["orm"] = prm_stages.train_reward(root, st, base, "orm", "outcome", outcome_records(train_labels))
    # the same PRM recipe on the checker's exact step labels: is it the labels or the model that limits?
    stages["prm_checker"] = prm_stages.train_reward(root, st, base, "prm_checker", "process", train_labels, "checker")
    prm = load_step_scorer(model, stages["prm"]["saved"], tok, "prm", max_seq_len=max_len)
    orm = load_step_scorer(model, stages["orm"]["saved"], tok, "orm", max_seq_len=max_len)
    prm_checker = load_step_scorer(model, stages["prm_checker"]["saved"], tok, "prm_checker", max_seq_len=max_len)

    # 1. held-out reward-model accuracy: targets are the checker's labels (the truth)
    rows = tokenize_label_records(heldout, tok, max_len, "process", "checker")
    reward_eval = {
        name: prm_report.reward_metrics(
            evaluate_labels(sm.model, rows, tok.pad_token_id, 64, torch.device("cpu"), sm.adapter), sm, heldout
        )
        for name, sm in (("prm", prm), ("orm", orm), ("prm_checker", prm_checker))
    }

    # 2. search on validation and test
    scorers = {
        "orm": lambda p: orm,
        "prm": lambda p: prm,
        "oracle": lambda p: CallableScorer(lambda q, r, a=p["answer"]: float(is_correct(r, a))),
    }
    configs = search_configs(s.budgets, st.max_new_tokens, s.step_tokens, s.max_steps)
    pool = SamplePool(
        sampler, tok, SamplingParams(max_new_tokens=st.max_new_tokens, temperature=st.temperature), seed=st.seed
    )
    models = {k: stages[k] for k in ("base", "policy", "prm", "orm")}  # what the search outcomes depend on
    t_search = time.perf_counter()
    tables = {}
    for split in ("val", "test"):
        chosen = {k: v for k, v in configs.items() if split == "test" or not k.startswith("fixed_allocation")}
        tables[split] = run_configs(
            chosen,
            data[split],
            sampler,
            pool,
            scorers,
            st.temperature,
            st.seed + (0 if split == "val" else 500),
            progress,
            root / "search" / split,
            models,
        )
    search_seconds = time.perf_counter() - t_search

    # 3. compute-optimal allocation (validation -> test)
    difficulty = {split: [1.0 - prm.prompt_score(p["prompt"]) for p in data[split]] for split in ("val", "test")}
    allocation = prm_report.allocation_study(
        tables, difficulty, configs, s.budgets, s.bins, data["test"], sampler, pool, scorers, prm, st
    )

    # 4-6. GRPO, swarm, the PRM in the policy's batch
    from fastpeft.demo import prm_grpo, prm_shared_batch, prm_swarm

    grpo = prm_grpo.compare(root, st, s.grpo, data, base, stages["policy"]["saved"], stages["prm"]["saved"])
    stages["roles"] = prm_stages.train_roles(root, st, base)
    swarm = prm_swarm.compare(model, tok, stages["roles"], s.swarm_problems, st, max_len)
    shared = prm_shared_batch.measure(model, tok, prm, data["test"][: s.shared_batch_problems], s, st)

    results = {
        "stages": stages,
        "reward_models": reward_eval,
        "search": {k: {l: r.row() for l, r in t.items()} for k, t in tables.items()},
        "per_problem": {
            k: {l: {"correct": r.correct, "tokens": r.tokens} for l, r in t.items()} for k, t in tables.items()
        },
        "difficulty": difficulty,
        "allocation": allocation,
        "grpo": grpo,
        "swarm": swarm,
        "shared_batch": shared,
        "pool_tokens_sampled": pool.tokens_sampled,
        "search_seconds": search_seconds,
        "settings": dataclasses.asdict(s),
        "total_seconds": time.perf_counter() - t0,
        "environment": {
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    results["targets"] = prm_report.targets(results, tables, s.budgets)
    (root / "evidence.json").write_text(json.dumps(results, indent=1, default=str))
    (root / "evidence.md").write_text(prm_report.markdown(results, s))
    prm_report.plot(results, root / "evidence.png", grpo, root / "grpo_curves.png")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpeft.demo.prm_evidence", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (cached stages, evidence.json / .md / .png)")
    parser.add_argument("--seed", type=int, default=0)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="every stage at toy size (numbers are meaningless)")
    size.add_argument("--small", action="store_true", help="full-size models; search and RL on fewer problems")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 avoids contention on a busy machine)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = EvidenceSettings.quick() if args.quick else EvidenceSettings.small() if args.small else EvidenceSettings()
    s.stages.seed = args.seed
    results = run(args.out, s, progress=not args.quick)
    print(prm_report.targets_table(results["targets"]))
    print(f"total {results['total_seconds']:.0f} s; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
