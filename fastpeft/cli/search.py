"""``fastpeft search``: answer a JSONL file of prompts with a search strategy under a compute budget.

Input: one JSON object per line, ``{"prompt": "...", "answer": "..."}`` (``answer`` optional).
Output (``--output`` or stdout): one object per input line with ``prompt``, ``answer``, ``score``,
``strategy``, ``tokens_spent``, ``forward_passes``, ``budget``, ``budget_unit``, ``text``, any
verifier problems, and ``correct`` when the input had an answer. A summary goes to stderr. Bad
input or arguments: one line on stderr, exit status 2.

The model is a local Hugging Face directory (``--model``; never downloaded), optionally with a
PEFT-format adapter (``--adapter``) loaded through :func:`fastpeft.load_adapter`, run by the
batched sampler (:class:`fastpeft.reasoning.sampler.Sampler`).

``--reward_model DIR`` (a process or outcome reward model from ``fastpeft reward``: an adapter with
``score_head.safetensors``) is loaded as a second adapter on the same model and scores the
candidates (``--verifier`` is then ignored); ``--quantize nf4`` puts the base in NF4 as QLoRA
trained it, and ``--reward_batch true`` decodes the policy rows and the reward model's rows in one
routed batch (:class:`fastpeft.reasoning.scored_sampler.ScoredSampler`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from fastpeft.cli.common import config_help, run_cli
from fastpeft.reasoning.answers import answers_match
from fastpeft.reasoning.budget import BUDGET_UNITS
from fastpeft.reasoning.search import STRATEGIES, search_many, strategy_options
from fastpeft.reasoning.types import Scorer
from fastpeft.training.config_io import parse_cli

VERIFIERS = ("formula", "python", "logic", "safety", "fact", "none")
# strategy options; one is passed only when given and only to strategies that take it
_OPTION_FLAGS = (
    "n",
    "beam_width",
    "max_steps",
    "max_depth",
    "expand",
    "n_thoughts",
    "keep",
    "threshold",
    "aggregate",
    "rollout",
    "probe_samples",
    "escalate_to",
)


class CliError(ValueError):
    """A problem with the user's input: reported on one line, exit status 2."""


@dataclasses.dataclass
class SearchConfig:
    model: str | None = None  # local Hugging Face model directory (required)
    adapter: str | None = None  # PEFT-format adapter directory to load on the model
    input: str | None = None  # JSONL file with {'prompt', optional 'answer'} per line (required)
    output: str | None = None  # JSONL file to write (default: stdout)
    strategy: str = "best_of_n"
    budget: int = 1024  # compute budget per prompt
    budget_unit: str = "tokens"  # one of BUDGET_UNITS
    verifier: list[str] | str = "formula"  # verifier(s) to score with, combined as a product
    reward_model: str | None = None  # learned PRM / ORM directory (adapter + score_head); replaces verifier
    reward_batch: bool = False  # score in the policy's decode batch (needs reward_model and --adapter)
    quantize: str | None = None  # "nf4": the base in NF4, as QLoRA adapters were trained
    kb: str | None = None  # knowledge-base file (.jsonl/.tsv) for verifier fact
    max_new_tokens: int = 64  # per response, or per step for step-level search
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    stop: str | None = None  # step delimiter for step-level strategies (e.g. '; ' or '\\n')
    seed: int = 0
    device: str | None = None  # cpu / cuda (default: cuda if available)
    no_progress: bool = False  # hide the progress bar
    # strategy options (see _OPTION_FLAGS)
    n: int | None = None
    beam_width: int | None = None
    max_steps: int | None = None
    max_depth: int | None = None
    expand: int | None = None
    n_thoughts: int | None = None
    keep: int | None = None
    threshold: float | None = None
    aggregate: str | None = None
    rollout: str | None = None
    probe_samples: int | None = None
    escalate_to: str | None = None


def read_requests(path: str) -> list[dict[str, Any]]:
    """Parse and check the input JSONL; errors name the file and line."""
    file = Path(path)
    if not file.is_file():
        raise CliError(f"input file not found: {path}")
    out = []
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise CliError(f"{path}:{lineno}: expected an object with a string 'prompt'")
        if not obj["prompt"].strip():
            raise CliError(f"{path}:{lineno}: prompt is empty")
        if "answer" in obj and not isinstance(obj["answer"], (str, int, float)):
            raise CliError(f"{path}:{lineno}: 'answer' must be a string or number")
        out.append(obj)
    if not out:
        raise CliError(f"{path}: no requests")
    return out


def build_scorer(names: list[str], kb: str | None) -> Scorer | None:
    from fastpeft.reasoning import verifiers as v

    names = [n for n in dict.fromkeys(names) if n != "none"]
    if not names:
        return None
    if "fact" in names and not kb:
        raise CliError("--verifier fact needs --kb <knowledge-base file>")
    make = {
        "formula": v.FormulaVerifier,
        "python": v.PythonSyntaxVerifier,
        "logic": v.LogicVerifier,
        "safety": v.SafetyVerifier,
        "fact": lambda: v.FactVerifier(kb),
    }
    stack = [(n, make[n]()) for n in names]
    return stack[0][1] if len(stack) == 1 else v.VerifierStack(stack)


def load_generator(model_dir: str, adapter: str | None, device: str | None, quantize: str | None = None):
    """The batched sampler over a local model (and adapter); CliError for a missing directory."""
    if not Path(model_dir).is_dir():
        raise CliError(f"--model directory not found: {model_dir}")
    if adapter is not None and not Path(adapter).is_dir():
        raise CliError(f"--adapter directory not found: {adapter}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastpeft.reasoning.sampler import Sampler

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device).eval()
    if adapter is not None:
        import fastpeft

        fastpeft.load_adapter(model, adapter, adapter_name="policy", **({"quantize": quantize} if quantize else {}))
    return Sampler(model, tokenizer)


def learned_scorer(sampler, directory: str, quantize: str | None, same_batch: bool):
    """A reward model as a second adapter on the sampler's model: (generator, scorer)."""
    if not Path(directory).is_dir():
        raise CliError(f"--reward_model directory not found: {directory}")
    from fastpeft.training.step_reward_model import load_step_scorer

    scorer = load_step_scorer(
        sampler.model, directory, sampler.tokenizer, "reward_model", quantize=quantize, max_seq_len=sampler.max_seq_len
    )
    if not same_batch:
        return sampler, scorer
    from fastpeft.reasoning.scored_sampler import ScoredSampler

    scored = ScoredSampler(
        sampler.model,
        sampler.tokenizer,
        scorer.model.head,
        "reward_model",
        max_seq_len=sampler.max_seq_len,
        fallback=scorer,
    )
    return scored, scored


def run(args: SearchConfig) -> int:
    if args.model is None or args.input is None:
        raise CliError("search needs --model DIR and --input FILE.jsonl")
    if args.strategy not in STRATEGIES:
        raise CliError(f"unknown strategy {args.strategy!r}; known strategies: {', '.join(sorted(STRATEGIES))}")
    if args.budget <= 0:
        raise CliError(f"--budget must be positive, got {args.budget}")
    if args.budget_unit not in BUDGET_UNITS:
        raise CliError(f"budget_unit: expected one of {list(BUDGET_UNITS)}, got {args.budget_unit!r}")
    accepted = set(strategy_options(args.strategy))
    options = {f: getattr(args, f) for f in _OPTION_FLAGS if getattr(args, f) is not None}
    unknown = sorted(set(options) - accepted)
    if unknown:
        flags = ", ".join("--" + f.replace("_", "-") for f in unknown)
        raise CliError(f"strategy {args.strategy!r} takes no {flags}")
    if args.stop is not None:
        if "stop" not in accepted:
            raise CliError(f"strategy {args.strategy!r} has no steps; drop --stop")
        options["stop"] = args.stop.encode().decode("unicode_escape")  # let users type '\n'
    requests = read_requests(args.input)
    verifiers = [args.verifier] if isinstance(args.verifier, str) else list(args.verifier)
    unknown = sorted(set(verifiers) - set(VERIFIERS))
    if unknown or not verifiers:
        raise CliError(f"verifier: expected some of {', '.join(VERIFIERS)}, got {verifiers}")
    if args.reward_batch and (args.reward_model is None or args.adapter is None):
        raise CliError("--reward_batch needs --reward_model and the policy --adapter (two adapters on one model)")
    if args.quantize not in (None, "nf4"):
        raise CliError(f"--quantize: expected nf4, got {args.quantize!r}")
    # the verifiers are checked before the model loads, so a bad flag fails fast
    scorer = build_scorer(verifiers, args.kb) if args.reward_model is None else None
    generator = load_generator(args.model, args.adapter, args.device, args.quantize)
    if args.reward_model is not None:
        generator, scorer = learned_scorer(generator, args.reward_model, args.quantize, args.reward_batch)
    results = search_many(
        generator,
        [r["prompt"] for r in requests],
        args.strategy,
        progress=not args.no_progress,
        budget=args.budget,
        budget_unit=args.budget_unit,
        scorer=scorer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        **options,
    )
    correct = graded = tokens = 0
    with open(args.output, "w", encoding="utf-8") if args.output else contextlib.nullcontext(sys.stdout) as out:
        for request, result in zip(requests, results):
            row = {k: v for k, v in result.to_dict().items() if k != "details"}
            row["verifier_problems"] = result.details.get("verifier_problems", [])
            if "answer" in request:
                row["reference"] = str(request["answer"])
                row["correct"] = answers_match(result.answer, str(request["answer"]))
                graded += 1
                correct += row["correct"]
            tokens += result.tokens_spent
            out.write(json.dumps(row) + "\n")
    summary = f"{len(results)} prompts, {args.strategy}, {tokens} tokens"
    if graded:
        summary += f", accuracy {correct}/{graded} = {correct / graded:.3f}"
    print(summary, file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    def body(args: list[str]) -> int:
        return run(parse_cli(SearchConfig, args))

    return run_cli("search", argv, body, lambda: config_help(SearchConfig, "search", __doc__.split("\n")[0]))
