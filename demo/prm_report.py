"""The PRM evidence's analysis and report: reward-model metrics with clustered standard errors,
the compute-optimal allocation study, the targets, the markdown tables and the plots."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastpeft.demo.prm_search_eval import ConfigResult, binomial_se, family, paired_difference, problem_seed
from fastpeft.reasoning.compute_optimal import fit_allocation

FAMILIES = {
    "greedy": "greedy",
    "majority": "majority vote",
    "bon_orm": "best-of-N + ORM",
    "weighted_orm": "weighted best-of-N + ORM",
    "bon_prm": "best-of-N + PRM",
    "beam_prm": "beam search + PRM",
    "fixed_allocation": "fixed-threshold allocation + PRM",
    "bon_oracle": "best-of-N + oracle",
}
# what the allocation may choose from: never the oracle, never itself
CANDIDATE_FAMILIES = ("greedy", "majority", "bon_orm", "weighted_orm", "bon_prm", "beam_prm")


def pairwise_with_se(finals: Sequence[float], outcomes: Sequence[int], prompts: Sequence[str]) -> dict[str, Any]:
    """Pairwise accuracy over (right, wrong) pairs of one prompt, with a standard error clustered by
    prompt (pairs of one prompt share responses, so they are not independent)."""
    groups: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for f, o, p in zip(finals, outcomes, prompts):
        groups[p].append((f, o))
    per = []  # (wins, pairs) per prompt
    for items in groups.values():
        right, wrong = [f for f, o in items if o], [f for f, o in items if not o]
        if right and wrong:
            wins = sum(1.0 if r > w else 0.5 if r == w else 0.0 for r in right for w in wrong)
            per.append((wins, len(right) * len(wrong)))
    total = sum(n for _, n in per)
    if not total:
        return {"accuracy": None, "se": None, "pairs": 0, "prompts": 0}
    acc = sum(w for w, _ in per) / total
    g = len(per)
    se = math.sqrt(g / max(g - 1, 1) * sum((w - acc * n) ** 2 for w, n in per)) / total
    return {"accuracy": acc, "se": se, "pairs": int(total), "prompts": g}


def reward_metrics(evaluated: dict[str, Any], scorer: Any, heldout: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Held-out metrics of one reward model: step / outcome accuracy, and pairwise accuracy (final
    score; for a PRM also the minimum step score) with clustered standard errors."""
    prompts, outcomes = [r["prompt"] for r in heldout], [r["outcome"] for r in heldout]
    finals = [scorer.score(r["prompt"], r["response"]) for r in heldout]
    out = {
        k: evaluated.get(k)
        for k in ("eval_step_accuracy", "eval_step_auc", "eval_outcome_accuracy", "eval_loss", "eval_boundaries")
    }
    n = len(heldout)
    acc = out["eval_outcome_accuracy"]
    out["outcome_se"] = math.sqrt(acc * (1 - acc) / n) if acc is not None else None
    out["pairwise_final"] = pairwise_with_se(finals, outcomes, prompts)
    mins = [min(scorer.step_scores(r["prompt"], r["response"]) or [1.0]) for r in heldout]
    out["pairwise_min_step"] = pairwise_with_se(mins, outcomes, prompts)
    out["responses"], out["right_share"] = n, sum(outcomes) / max(n, 1)
    return out


def lookup(
    policy: Any, difficulty: Sequence[float], table: Mapping[str, ConfigResult]
) -> tuple[list[bool], list[int], list[str]]:
    """An allocation applied to a split by table: each problem gets its bin's configuration's outcome."""
    correct, tokens, labels = [], [], []
    for i, d in enumerate(difficulty):
        label = policy.config_for(d)[0]
        correct.append(table[label].correct[i])
        tokens.append(table[label].tokens[i])
        labels.append(label)
    return correct, tokens, labels


def allocation_study(
    tables: Mapping[str, Mapping[str, ConfigResult]],
    difficulty: Mapping[str, list[float]],
    configs: Mapping[str, Mapping[str, Any]],
    budgets: Sequence[int],
    bins: int,
    test: Sequence[Mapping[str, str]],
    sampler: Any,
    pool: Any,
    scorers: Mapping[str, Any],
    prm: Any,
    st: Any,
) -> dict[str, Any]:
    """Fit the compute-optimal allocation on validation at several mean-token limits, apply it to
    test by table, and run it live at a quarter of best-of-N's 4096-token cost."""
    from fastpeft.reasoning.answers import answers_match
    from fastpeft.reasoning.search import search

    val, tst = tables["val"], tables["test"]
    candidates = [k for k in val if family(k) in CANDIDATE_FAMILIES]
    configs = {k: {o: v for o, v in c.items() if o != "source"} for k, c in configs.items()}  # pool: evaluation only
    top = f"bon_orm@{max(budgets)}"
    quarter = val[top].mean_tokens / 4
    limits = [*sorted({*(float(b) for b in budgets if b < max(budgets)), quarter}), None]
    rows = []
    for limit in limits:
        try:
            policy = fit_allocation(
                difficulty["val"],
                {k: val[k].correct for k in candidates},
                {k: val[k].tokens for k in candidates},
                configs,
                bins,
                limit,
            )
        except ValueError as err:
            rows.append({"limit": limit, "error": str(err)})
            continue
        correct, tokens, _ = lookup(policy, difficulty["test"], tst)
        rows.append(
            {
                "limit": limit,
                "edges": policy.edges,
                "choices": policy.choices,
                "val_accuracy": policy.expected_accuracy,
                "val_tokens": policy.expected_tokens,
                "test_accuracy": sum(correct) / len(correct),
                "test_se": binomial_se(correct),
                "test_tokens": sum(tokens) / len(tokens),
                "correct": correct,
                "tokens": tokens,
                "is_quarter": limit == quarter,
            }
        )
    live = {}
    target = next((r for r in rows if r.get("is_quarter") and "error" not in r), None)
    if target is not None:
        policy = fit_allocation(
            difficulty["val"],
            {k: val[k].correct for k in candidates},
            {k: val[k].tokens for k in candidates},
            configs,
            bins,
            quarter,
        )
        named = {k: v(None) for k, v in scorers.items() if k != "oracle"}
        correct, tokens = [], []
        for i, prob in enumerate(test):
            result = search(
                sampler,
                prob["prompt"],
                "compute_optimal",
                budget=max(budgets),
                policy=policy,
                difficulty=lambda p: 1.0 - prm.prompt_score(p),
                scorers=named,
                temperature=st.temperature,
                seed=problem_seed(st.seed + 500, i),
            )
            correct.append(answers_match(result.answer, prob["answer"]))
            tokens.append(result.tokens_spent)
        live = {
            "accuracy": sum(correct) / len(correct),
            "se": binomial_se(correct),
            "mean_tokens": sum(tokens) / len(tokens),
            "correct": correct,
            "tokens": tokens,
        }
    return {
        "rows": rows,
        "quarter_limit": quarter,
        "reference": top,
        "live_at_quarter": live,
        "bins": bins,
        "difficulty": "1 - PRM value of the bare question",
    }


def targets(
    results: Mapping[str, Any], tables: Mapping[str, Mapping[str, ConfigResult]], budgets: Sequence[int]
) -> list[dict[str, Any]]:
    """Each target of issue 16 with its measured value, standard error and whether it is met."""
    test = tables["test"]
    top = max(budgets)
    rm = results["reward_models"]
    best = max(rm, key=lambda k: rm[k]["pairwise_final"]["accuracy"] or 0)
    out = [
        {
            "target": "reward model pairwise accuracy (held-out) >= 0.90",
            "model": best,
            "value": rm[best]["pairwise_final"]["accuracy"],
            "se": rm[best]["pairwise_final"]["se"],
            "met": (rm[best]["pairwise_final"]["accuracy"] or 0) >= 0.90,
        }
    ]
    for b in (1024, top):
        if f"beam_prm@{b}" in test:
            d, se = paired_difference(test[f"beam_prm@{b}"].correct, test[f"bon_orm@{b}"].correct)
            out.append(
                {
                    "target": f"beam search + PRM - best-of-N + ORM at {b} tokens >= +0.10",
                    "value": d,
                    "se": se,
                    "met": d >= 0.10,
                    "a": test[f"beam_prm@{b}"].row(),
                    "b": test[f"bon_orm@{b}"].row(),
                }
            )
    quarter = next((r for r in results["allocation"]["rows"] if r.get("is_quarter") and "error" not in r), None)
    ref = test[f"bon_orm@{top}"]
    if quarter is not None:
        d, se = paired_difference(quarter["correct"], ref.correct)
        ratio = quarter["test_tokens"] / ref.mean_tokens
        out.append(
            {
                "target": f"compute-optimal reaches best-of-N + ORM's {top}-token accuracy with <= 1/4 of its tokens",
                "value": d,
                "se": se,
                "token_ratio": ratio,
                "met": d >= 0 and ratio <= 0.25,
                "allocation": {k: quarter[k] for k in ("test_accuracy", "test_se", "test_tokens", "choices")},
                "best_of_n": ref.row(),
            }
        )
    d, se = paired_difference(test[f"beam_prm@{top}"].correct, test[f"bon_oracle@{top}"].correct)
    out.append(
        {
            "target": f"beam search + PRM within 5 points of best-of-N + oracle at {top} tokens",
            "value": d,
            "se": se,
            "met": d >= -0.05,
            "a": test[f"beam_prm@{top}"].row(),
            "b": test[f"bon_oracle@{top}"].row(),
        }
    )
    return out


def _fmt(x: float | None, se: float | None = None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def targets_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| target | measured (± s.e.) | met |", "|---|---|---|"]
    for r in rows:
        extra = f"; tokens {r['token_ratio']:.3f} of best-of-N's" if "token_ratio" in r else ""
        lines.append(f"| {r['target']} | {_fmt(r['value'], r['se'])}{extra} | {'yes' if r['met'] else 'no'} |")
    return "\n".join(lines)


def search_table(rows: Mapping[str, Mapping[str, Any]], budgets: Sequence[int]) -> str:
    lines = ["| strategy | " + " | ".join(f"{b} tokens" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    by = {(family(k), r["budget"]): r for k, r in rows.items()}
    for fam, name in FAMILIES.items():
        if fam == "greedy":
            r = rows.get("greedy")
            if r:
                cell = f"{_fmt(r['accuracy'], r['se'])} ({r['mean_tokens']:.0f})"
                lines.append(f"| {name} | " + " | ".join([cell] * len(budgets)) + " |")
            continue
        cells = [by.get((fam, b)) for b in budgets]
        if any(cells):
            lines.append(
                f"| {name} | "
                + " | ".join(f"{_fmt(c['accuracy'], c['se'])} ({c['mean_tokens']:.0f})" if c else "" for c in cells)
                + " |"
            )
    return "\n".join(lines)


def markdown(results: Mapping[str, Any], s: Any) -> str:
    """The generated report (tables only; the reading lives in demo/prm_evidence.md)."""
    from fastpeft.demo import prm_report_sections as sections

    return sections.render(results, s)


def plot(results: Mapping[str, Any], path: Path, grpo: Mapping[str, Any], grpo_path: Path) -> None:
    from fastpeft.demo import prm_report_sections as sections

    sections.plot_search(results, path)
    sections.plot_grpo(grpo, grpo_path)
