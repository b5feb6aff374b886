"""Accuracy versus compute: every strategy on the same problems at the same budgets.

``accuracy_vs_compute(generator, [(prompt, answer), ...], budgets=[256, 1024, 4096])`` runs each
strategy (greedy, best-of-N, weighted best-of-N, beam search with the verifier, MCTS, dynamic
allocation by default) on every problem at every budget and returns one :class:`EvidenceRow` per
(strategy, budget). :func:`format_table` renders them as markdown, :func:`save_plot` as a PNG of
accuracy against the compute actually spent. Meant to be run on the SFT-trained tiny arithmetic
model; nothing here assumes a model or a task beyond "the answer can be extracted and compared".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fastpeft.reasoning.allocation import DifficultyEstimator, OutcomeHistory
from fastpeft.reasoning.answers import answers_match
from fastpeft.reasoning.budget import BudgetUnit
from fastpeft.reasoning.search import get_strategy, search, strategy_options
from fastpeft.reasoning.types import Generator, Scorer

DEFAULT_STRATEGIES: Mapping[str, Mapping[str, Any]] = {
    "greedy": {},
    "best_of_n": {"n": 64},
    "weighted_best_of_n": {"n": 64},
    "beam_search": {"n": 8, "beam_width": 4},
    "mcts": {},
    "dynamic_allocation": {},
}


@dataclasses.dataclass
class EvidenceRow:
    strategy: str
    budget: int
    budget_unit: str
    correct: int
    total: int
    mean_tokens: float
    mean_forward_passes: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def accuracy_vs_compute(
    generator: Generator,
    dataset: Sequence[tuple[str, str]],
    budgets: Sequence[int],
    strategies: Mapping[str, Mapping[str, Any]] | None = None,
    scorer: Scorer | None = None,
    budget_unit: BudgetUnit = "tokens",
    stop: str | None = None,
    search_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[EvidenceRow]:
    """One row per (strategy, budget); see the module docstring.

    ``strategies`` maps a label to options; an option ``"strategy"`` names the registered strategy
    when the label is not one (``{"beam w8": {"strategy": "beam_search", "beam_width": 8}}``).
    ``stop`` is the step delimiter given to step-level strategies; ``search_kwargs`` go to every
    :func:`search` call (``max_new_tokens``, ``temperature``, ``seed``, ...). Dynamic allocation
    learns as it goes: each budget starts an empty outcome history that records every answer.
    """
    if not dataset:
        raise ValueError("dataset is empty")
    if not budgets or any(b <= 0 for b in budgets):
        raise ValueError(f"budgets must be a non-empty list of positive ints, got {list(budgets)}")
    for i, item in enumerate(dataset):
        if len(item) != 2 or not isinstance(item[0], str) or not item[0].strip():
            raise ValueError(f"dataset[{i}] must be a (non-empty prompt, answer) pair, got {item!r}")
    plan = {label: dict(opts) for label, opts in (strategies or DEFAULT_STRATEGIES).items()}
    for label, opts in plan.items():
        get_strategy(opts.get("strategy", label))  # unknown names fail before any compute is spent
    rows = []
    bar = tqdm(total=len(plan) * len(budgets) * len(dataset), desc="evidence", disable=not progress)
    for label, opts in plan.items():
        name = opts.pop("strategy", label)
        accepted = strategy_options(name)
        if stop is not None and "stop" in accepted:
            opts.setdefault("stop", stop)
        for budget in budgets:
            run_opts = dict(opts)
            history = None
            if "estimator" in accepted and "estimator" not in run_opts:
                history = OutcomeHistory()
                run_opts["estimator"] = DifficultyEstimator(history=history)
            correct = tokens = passes = 0
            for prompt, answer in dataset:
                result = search(
                    generator, prompt, name, budget, budget_unit, scorer, **dict(search_kwargs or {}), **run_opts
                )
                ok = answers_match(result.answer, str(answer))
                correct += ok
                tokens += result.tokens_spent
                passes += result.forward_passes
                if history is not None:
                    history.add(prompt, ok)
                bar.update(1)
            n = len(dataset)
            rows.append(EvidenceRow(label, budget, budget_unit, correct, n, tokens / n, passes / n))
    bar.close()
    return rows


def format_table(rows: Sequence[EvidenceRow]) -> str:
    """Markdown: one line per strategy, one column per budget, cells "accuracy (mean tokens)"."""
    budgets = sorted({r.budget for r in rows})
    labels = list(dict.fromkeys(r.strategy for r in rows))
    cell = {(r.strategy, r.budget): f"{r.accuracy:.3f} ({r.mean_tokens:.0f})" for r in rows}
    unit = rows[0].budget_unit if rows else "tokens"
    lines = ["| strategy | " + " | ".join(f"{b} {unit}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    lines += [f"| {s} | " + " | ".join(cell.get((s, b), "") for b in budgets) + " |" for s in labels]
    return "\n".join(lines)


def save_json(rows: Sequence[EvidenceRow], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps([{**dataclasses.asdict(r), "accuracy": r.accuracy} for r in rows], indent=2))
    return path


def save_plot(rows: Sequence[EvidenceRow], path: str | Path, title: str = "accuracy vs compute") -> Path:
    """PNG of accuracy against mean compute spent per problem (log x), one line per strategy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no rows to plot")
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)  # attaches itself; no pyplot, so no global backend state
    ax = fig.add_subplot()
    use_passes = rows[0].budget_unit == "forward_passes"
    for label in dict.fromkeys(r.strategy for r in rows):
        mine = sorted((r for r in rows if r.strategy == label), key=lambda r: r.budget)
        xs = [max(r.mean_forward_passes if use_passes else r.mean_tokens, 1e-9) for r in mine]
        ax.plot(xs, [r.accuracy for r in mine], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("mean " + ("forward passes" if use_passes else "generated tokens") + " per problem")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
