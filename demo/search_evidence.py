"""Accuracy versus compute on the bundled arithmetic task, with an SFT-trained tiny model on CPU.

    python -m fastpeft.demo.search_evidence --out DIR [--seed 0] [--problems 100]
        [--budgets 256 1024 4096] [--sft-steps 300] [--model DIR] [--threads 1]

Pipeline:

1. **Model.** A tiny Llama (from a config, bundled character tokenizer) fully fine-tuned with the
   library's SFT recipe on ``digits``-digit additions with worked column steps, stopped early on
   purpose so greedy decoding is right only part of the time (search needs room to help). With
   ``--model DIR`` an already-trained model directory (``save_pretrained`` + tokenizer) is reused.
2. **Evidence.** :func:`fastpeft.demo.accuracy_vs_compute.accuracy_vs_compute` runs greedy, best-of-N,
   weighted best-of-N, beam search, MCTS and dynamic allocation on held-out problems at each token
   budget, all guided by :class:`ArithmeticStepVerifier` (a process verifier, steps = ``"; "``).
   Options that size a strategy (N, beam N) grow with the budget, so every strategy may spend it.
   Two adaptive allocations: ``dynamic_allocation`` (the library's query-feature + outcome-history
   router to greedy / beam / MCTS; it hands one ``max_new_tokens`` to every route, here the per-step
   one, so its greedy route is cut off after one step's worth of tokens and cannot finish) and
   ``metacognitive`` (4 sampled probes; unanimous answers return at once, the rest escalate to
   weighted best-of-N with the budget left: per-question allocation from the model's own
   uncertainty, the closest here to Snell et al.'s compute-optimal strategy).
3. **Outputs** in ``--out``: ``evidence.json`` (rows + settings + environment), ``evidence.md``
   (markdown table) and ``evidence.png`` (accuracy against mean generated tokens per problem).

The verifier by default checks only what a response says about itself (each column sum, the carry
flow, the written digits, and that the final answer is the number those digits spell), not the
operand digits against the question: with ``check_operands=True`` it would know the answer and be
an oracle, which makes any search look good. Copying a wrong digit from the question therefore goes
unnoticed, as it would by a learned verifier that cannot solve the task itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastpeft.demo.accuracy_vs_compute import accuracy_vs_compute, format_table, save_plot
from fastpeft.demo.arithmetic import make_arithmetic_dataset
from fastpeft.training.model_setup import load_saved_model

TINY_ARITHMETIC_LLAMA = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 112,
    "max_position_embeddings": 160,
    "tie_word_embeddings": False,
}
STEP_DELIMITER = "; "
_QUESTION = re.compile(r"Q:\s*(\d+)\+(\d+)=\?")
_COLUMN = re.compile(r"^(\d)\+(\d)(\+1)?=(\d+)(?: write (\d) carry 1)?$")
_ANSWER = re.compile(r"^answer (-?\d+)$")


class ArithmeticStepVerifier:
    """Process verifier for the bundled addition format (``"7+8=15 write 5 carry 1; 4+3+1=8; answer 85"``).

    Each step, read left to right, passes or fails one check: a column step needs the right sum,
    a ``+1`` exactly when the previous column carried, and ``write d carry 1`` exactly when the sum
    is >= 10 with ``d`` its last digit; ``write 1`` must follow a carry; ``answer N`` must equal the
    number the written digits spell. With ``check_operands`` the column digits must also be the
    question's (then the verifier knows the answer). A partial response is scored on the steps it
    has; an unfinished last step (no delimiter, no answer) is not judged yet.
    Score = passed / judged steps (1.0 when nothing can be judged yet).
    """

    def __init__(self, check_operands: bool = False) -> None:
        self.check_operands = check_operands

    def step_results(self, prompt: str, response: str) -> list[bool]:
        """One pass/fail per judged step, in order."""
        m = _QUESTION.search(prompt)
        if m is None:
            raise ValueError(f"ArithmeticStepVerifier expects an addition prompt 'Q: a+b=?', got {prompt!r}")
        a, b = m.group(1), m.group(2)
        width = max(len(a), len(b))
        col_a, col_b = [int(d) for d in a.zfill(width)[::-1]], [int(d) for d in b.zfill(width)[::-1]]
        pieces = response.strip().split(";")
        complete = response.rstrip(" ").endswith(";") or "answer" in pieces[-1]
        steps = [p.strip() for p in (pieces if complete else pieces[:-1]) if p.strip()]
        results, written, carry, col = [], [], 0, 0
        for step in steps:
            if (column := _COLUMN.match(step)) is not None:
                da, db, plus, total, write = column.groups()
                da, db, total = int(da), int(db), int(total)
                ok = da + db + (1 if plus else 0) == total and bool(plus) == bool(carry)
                ok = ok and (write is not None) == (total >= 10) and (write is None or int(write) == total % 10)
                if self.check_operands:
                    ok = ok and col < width and (da, db) == (col_a[col], col_b[col])
                written.append(total % 10)
                carry, col = total // 10, col + 1
            elif step == "write 1":
                ok = carry == 1 and (not self.check_operands or col == width)
                written.append(1)
                carry = 0
            elif (ans := _ANSWER.match(step)) is not None:
                spelled = int("".join(map(str, reversed(written)))) if written else None
                ok = spelled is not None and carry == 0 and int(ans.group(1)) == spelled
                if self.check_operands:
                    ok = ok and col == width
            else:
                ok = False  # a malformed step
            results.append(ok)
        return results

    def score(self, prompt: str, response: str) -> float:
        results = self.step_results(prompt, response)
        return sum(results) / len(results) if results else 1.0


@dataclasses.dataclass
class EvidenceSettings:
    seed: int = 0
    digits: int = 3
    train_problems: int = 4000
    sft_steps: int = 300
    sft_lr: float = 3e-3
    sft_batch: int = 32
    test_problems: int = 100
    budgets: tuple[int, ...] = (256, 1024, 4096)
    temperature: float = 0.8
    response_tokens: int = 100  # longest 3-digit response is 97 characters (+ EOS)
    step_tokens: int = 28  # longest column step, "8+5+1=14 write 4 carry 1; ", is 26
    check_operands: bool = False
    model_config: dict = dataclasses.field(default_factory=lambda: dict(TINY_ARITHMETIC_LLAMA))


def train_model(out_dir: Path, s: EvidenceSettings) -> tuple[Any, Any, dict[str, Any]]:
    """SFT the tiny model (full fine-tuning, CPU) and load it back from its saved directory."""
    from fastpeft.training import sft

    train = make_arithmetic_dataset(s.train_problems, seed=s.seed, digits=s.digits)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = sft.train(
            sft.SFTConfig(
                model_config=s.model_config,
                finetune="full",
                train_data=train,
                max_steps=s.sft_steps,
                lr=s.sft_lr,
                micro_batch_size=s.sft_batch,
                warmup_steps=min(20, s.sft_steps // 4),
                scheduler="cosine",
                max_seq_len=128,
                output_dir=str(out_dir / "sft"),
                log_every=25,
                seed=s.seed,
                progress=False,
                device="cpu",
                plot=False,
            )
        )
    model, tok = load_saved_model(result.saved)
    info = {
        "sft_steps": result.steps,
        "final_loss": result.final_loss,
        "train_seconds": time.perf_counter() - start,
        "model_dir": str(result.saved),
    }
    return model, tok, info


def test_set(s: EvidenceSettings) -> list[tuple[str, str]]:
    """Held-out problems: disjoint from the SFT set (same seed, same size), deterministic."""
    train = make_arithmetic_dataset(s.train_problems, seed=s.seed, digits=s.digits)
    test = make_arithmetic_dataset(
        s.test_problems, seed=s.seed + 1, digits=s.digits, exclude={r["prompt"] for r in train}
    )
    return [(r["prompt"], r["answer"]) for r in test]


def strategies_for(budget: int, s: EvidenceSettings) -> dict[str, dict[str, Any]]:
    """Each strategy's options at ``budget`` tokens: N and beam N grow so the budget can be spent."""
    full, step = {"max_new_tokens": s.response_tokens}, {"max_new_tokens": s.step_tokens}
    n = max(1, budget // (s.response_tokens * 2 // 3))  # a typical response is ~2/3 of the cap
    beam_width = 4
    beam_n = max(beam_width, n // beam_width * beam_width)
    return {
        "greedy": dict(full),
        "best_of_n": {**full, "n": n},
        "weighted_best_of_n": {**full, "n": n},
        "beam_search": {**step, "n": beam_n, "beam_width": beam_width},
        "mcts": {**step, "expand": 3, "max_depth": s.digits + 2, "max_iterations": 256},
        # its greedy route inherits the per-step max_new_tokens (see the module docstring)
        "dynamic_allocation": {**step, "beam_n": beam_n, "beam_width": beam_width, "mcts_depth": s.digits + 2},
        # difficulty from the model itself: unanimous probes answer at once, others get best-of-N
        "metacognitive": {
            **full,
            "probe_samples": 4,
            "measure": "disagreement",
            "threshold": 0.0,
            "escalate_to": "weighted_best_of_n",
            "escalate_options": {"n": n},
        },
    }


def run(
    out_dir: str | Path,
    s: EvidenceSettings | None = None,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (unless ``model``/``tokenizer`` are given), run every strategy at every budget, write outputs."""
    from fastpeft.reasoning.sampler import Sampler

    s = s or EvidenceSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    train_info: dict[str, Any] = {"trained": False}
    if model is None:
        model, tokenizer, train_info = train_model(out, s)
        train_info["trained"] = True
    elif tokenizer is None:
        raise ValueError("a model was given without its tokenizer")
    data = test_set(s)
    sampler = Sampler(model, tokenizer, max_seq_len=int(s.model_config.get("max_position_embeddings", 160)))
    verifier = ArithmeticStepVerifier(check_operands=s.check_operands)
    rows, start = [], time.perf_counter()
    for budget in s.budgets:
        rows += accuracy_vs_compute(
            sampler,
            data,
            [budget],
            strategies_for(budget, s),
            scorer=verifier,
            stop=STEP_DELIMITER,
            search_kwargs={"temperature": s.temperature, "seed": s.seed},
            progress=progress,
        )
    order = list(strategies_for(s.budgets[0], s))
    rows.sort(key=lambda r: (order.index(r.strategy), r.budget))
    search_seconds = time.perf_counter() - start
    table = format_table(rows)
    results = {
        "rows": [{**dataclasses.asdict(r), "accuracy": r.accuracy} for r in rows],
        "table": table,
        "settings": dataclasses.asdict(s),
        "strategy_options": {str(b): strategies_for(b, s) for b in s.budgets},
        "verifier": {"name": "ArithmeticStepVerifier", "check_operands": s.check_operands},
        "train": train_info,
        "search_seconds": search_seconds,
        "environment": {
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    (out / "evidence.json").write_text(json.dumps(results, indent=2))
    (out / "evidence.md").write_text(
        f"{len(data)} held-out {s.digits}-digit additions; cells: accuracy (mean generated tokens per problem)\n\n"
        + table
        + "\n"
    )
    save_plot(
        rows, out / "evidence.png", title=f"{s.digits}-digit addition, tiny SFT Llama, CPU ({len(data)} problems)"
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastpeft.demo.search_evidence", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="output directory (evidence.json / .md / .png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--problems", type=int, default=EvidenceSettings.test_problems)
    parser.add_argument("--budgets", type=int, nargs="+", default=list(EvidenceSettings.budgets))
    parser.add_argument("--sft-steps", type=int, default=EvidenceSettings.sft_steps)
    parser.add_argument("--model", help="reuse a trained model directory instead of training one")
    parser.add_argument("--check-operands", action="store_true", help="oracle verifier (knows the answer)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 avoids the thread contention that makes tiny matmuls crawl on a busy machine",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = EvidenceSettings(
        seed=args.seed,
        test_problems=args.problems,
        budgets=tuple(args.budgets),
        sft_steps=args.sft_steps,
        check_operands=args.check_operands,
    )
    model = tok = None
    if args.model:
        model, tok = load_saved_model(args.model)
    results = run(args.out, s, model, tok)
    print(results["table"])
    print(f"search: {results['search_seconds']:.0f} s; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
