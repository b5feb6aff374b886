"""Automatic step labels for process reward models (Math-Shepherd style), and a resumable builder.

A *solution* is a policy sample for a prompt; its *prefixes* are the response cut after each step
delimiter (``"; "``), starting with the empty prefix (the bare question) and ending with the whole
response. Each prefix gets a label:

- **Monte Carlo** (:class:`MonteCarloLabeller`, Wang et al. 2024, "Math-Shepherd"): roll out ``K``
  completions of ``prompt + prefix`` with the policy; ``soft`` = the fraction that reach the gold
  answer (an estimate of the prefix's value under the policy), ``hard`` = 1 if any does. The whole
  response needs no rollouts: its label is its own outcome. The empty prefix's soft label is the
  question's pass rate, which a PRM trained on it learns to predict (a difficulty estimate that
  costs no generation).
- **Checker** (:class:`CheckerLabeller`): where the task has a step checker ``check(prompt,
  response) -> [bool per step]``, a prefix is labelled 1 when every step in it passes.

Records (one JSON object per line)::

    {"id": 17, "prompt": "Q: ...\\nA:", "answer": "38", "response": " 4*6=24; 23+24=47; ...; answer 38",
     "step_ends": [0, 9, 19, 29, 39], "soft": [0.5, 0.75, 0.75, 1.0, 1.0], "hard": [1, 1, 1, 1, 1],
     "checker": [1, 1, 1, 1, 1], "outcome": 1, "rollouts": 8}

``response[:step_ends[i]]`` is prefix ``i``; every label list is aligned with ``step_ends``.

:func:`build_step_labels` (``fastpeft step-labels``) labels a JSONL file of ``{"prompt", "answer"}``
records in chunks of ``batch_prompts`` prompts (one batched sampler call for the solutions and one
for all their rollouts), appends each finished chunk to the output, and on restart skips the chunks
already there, so an interrupted run resumes where it stopped and gives the same file (chunk ``c``
samples with seed ``seed + c``; the settings are kept beside the output and must match to resume).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastpeft.reasoning.answers import is_correct
from fastpeft.reasoning.types import Generator, SamplingParams
from fastpeft.reasoning.verifiers.learned import split_steps

StepChecker = Callable[[str, str], Sequence[bool]]
# settings that change the labels: resuming with other values would mix two datasets in one file
_RESUME_KEYS = (
    "model",
    "adapter",
    "rollouts",
    "keep_rollouts",
    "samples_per_prompt",
    "temperature",
    "max_new_tokens",
    "delimiter",
    "checker",
    "batch_prompts",
    "seed",
)


def step_ends(response: str, delimiter: str = "; ") -> list[int]:
    """Character offsets that end each prefix: 0 (the empty prefix), after each delimiter, and the
    end of ``response`` (unless it already ends with a delimiter)."""
    ends = [0] + [len(p) for p in split_steps(response, delimiter)]
    return [e for i, e in enumerate(ends) if i == 0 or e > ends[i - 1]]


class MonteCarloLabeller:
    """Soft and hard labels from ``rollouts`` policy completions of every proper prefix.

    ``params`` are the rollouts' sampling parameters (``max_new_tokens`` is per rollout, the rest of
    the response); ``max_rows`` bounds the rows of one generate call. ``keep_rollouts`` stores the
    rollouts' texts (``rollout_texts[i][j]`` continues prefix ``i``), each a full response with a
    known outcome: training data for an outcome model at no extra generation (:func:`outcome_records`).
    """

    def __init__(
        self,
        generator: Generator,
        params: SamplingParams,
        rollouts: int = 8,
        delimiter: str = "; ",
        max_rows: int = 512,
        keep_rollouts: bool = False,
    ):
        if rollouts < 1:
            raise ValueError(f"rollouts must be >= 1, got {rollouts}")
        if max_rows < rollouts:
            raise ValueError(f"max_rows ({max_rows}) must be at least rollouts ({rollouts})")
        self.generator, self.params, self.rollouts = generator, params, rollouts
        self.delimiter, self.max_rows, self.keep_rollouts = delimiter, max_rows, keep_rollouts

    def label(self, items: Sequence[tuple[str, str, str]], seed: int | None = None) -> list[dict[str, Any]]:
        """``items``: ``(prompt, answer, response)``; one record (without ``id``) per item."""
        records, jobs = [], []  # jobs: (record index, prefix index, prompt + prefix)
        for r, (prompt, answer, response) in enumerate(items):
            ends = step_ends(response, self.delimiter)
            outcome = int(is_correct(response, answer))
            records.append(
                {
                    "prompt": prompt,
                    "answer": str(answer),
                    "response": response,
                    "step_ends": ends,
                    "soft": [float(outcome)] * len(ends),
                    "hard": [outcome] * len(ends),
                    "outcome": outcome,
                    "rollouts": self.rollouts,
                }
            )
            if self.keep_rollouts:
                records[-1]["rollout_texts"] = [[] for _ in ends[:-1]]
            jobs += [(r, i, prompt + response[:end]) for i, end in enumerate(ends[:-1])]
        per_call = max(1, self.max_rows // self.rollouts)
        for start in range(0, len(jobs), per_call):
            chunk = jobs[start : start + per_call]
            params = self.params if seed is None else dataclasses.replace(self.params, seed=seed + start)
            outs = self.generator.generate([text for _, _, text in chunk], params, n=self.rollouts)
            for (r, i, _), completions in zip(chunk, outs, strict=True):
                rec = records[r]
                prefix = rec["response"][: rec["step_ends"][i]]
                hits = [is_correct(prefix + c.text, rec["answer"]) for c in completions]
                rec["soft"][i] = sum(hits) / len(hits)
                rec["hard"][i] = int(any(hits))
                if self.keep_rollouts:
                    rec["rollout_texts"][i] = [c.text for c in completions]
        return records


class CheckerLabeller:
    """Labels from a step checker: prefix ``i`` is 1 when the checker passes every step in it."""

    def __init__(self, check: StepChecker, delimiter: str = "; ") -> None:
        if not callable(check):
            raise TypeError(f"check must be a callable (prompt, response) -> [bool], got {type(check).__name__}")
        self.check, self.delimiter = check, delimiter

    def labels(self, prompt: str, response: str, ends: Sequence[int] | None = None) -> list[int]:
        ends = step_ends(response, self.delimiter) if ends is None else ends
        out = []
        for end in ends:
            results = list(self.check(prompt, response[:end])) if end else []
            out.append(int(all(results)))
        return out

    def add_labels(self, records: Sequence[dict[str, Any]]) -> None:
        """Add a ``checker`` list to every record (in place)."""
        for rec in records:
            rec["checker"] = self.labels(rec["prompt"], rec["response"], rec["step_ends"])


def import_checker(spec: str) -> StepChecker:
    """``"package.module:function"`` -> the function (for configs and the CLI)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"checker must be 'package.module:function', got {spec!r}")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"checker {spec!r}: {module} has no function {name!r}")
    return fn


@dataclasses.dataclass
class StepLabelConfig:
    """``fastpeft step-labels``: label policy samples of ``input`` prompts into ``output``."""

    model: str | None = dataclasses.field(default=None, metadata={"path": True})  # local HF model directory
    adapter: str | None = dataclasses.field(default=None, metadata={"path": True})  # policy adapter to load
    input: str | None = dataclasses.field(default=None, metadata={"path": True})  # JSONL {"prompt", "answer"}
    output: str = "runs/step_labels/labels.jsonl"
    rollouts: int = 8  # K completions per prefix; 0: no Monte Carlo labels (outcome and checker only)
    keep_rollouts: bool = False  # store the rollouts' texts (outcome-model data)
    samples_per_prompt: int = 1  # solutions labelled per prompt
    temperature: float = 0.8
    max_new_tokens: int = 160  # per solution (and per rollout)
    delimiter: str = "; "
    checker: str | None = None  # "package.module:function" step checker, e.g. fastpeft.demo.hard_tier:check_steps
    batch_prompts: int = 16  # prompts per chunk (the unit of resumption)
    max_rows: int = 512  # rows of one generate call
    limit: int | None = None  # label only the first `limit` prompts
    seed: int = 0
    device: str = "auto"
    max_seq_len: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "max_new_tokens", "batch_prompts", "max_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rollouts < 0:
            raise ValueError(f"rollouts must be >= 0, got {self.rollouts}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (greedy rollouts would all agree), got {self.temperature}")
        if not self.delimiter:
            raise ValueError("delimiter must be non-empty")


def _settings(config: StepLabelConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in _RESUME_KEYS}


def _done_ids(output: Path, meta: Path, settings: dict[str, Any]) -> set[int]:
    if not output.exists():
        return set()
    if meta.exists():
        old = json.loads(meta.read_text())
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise ValueError(
                f"{output} was built with other settings {changed} (old, new); use another output or delete it"
            )
    done = set()
    for n, line in enumerate(output.read_text().splitlines(), 1):
        if line.strip():
            try:
                done.add(int(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{output}:{n}: not a step-label record ({err})") from err
    return done


def build_step_labels(
    config: StepLabelConfig, generator: Generator | None = None, records: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Label ``records`` (default: ``config.input``) chunk by chunk into ``config.output`` (resumable).

    ``generator`` defaults to the batched sampler on ``config.model`` (+ ``config.adapter``).
    Returns a summary: records written now and in all, label means, sampled accuracy.
    """
    from tqdm.auto import tqdm

    from fastpeft.training.data import load_records

    if records is None:
        if config.input is None:
            raise ValueError("step-labels needs input (a JSONL file of {'prompt', 'answer'} records)")
        records = load_records(config.input)
    records = list(records)[: config.limit] if config.limit else list(records)
    for i, rec in enumerate(records):
        if not isinstance(rec.get("prompt"), str) or "answer" not in rec:
            raise ValueError(f"input record {i} needs a string 'prompt' and an 'answer' (keys: {sorted(rec)})")
    checker = CheckerLabeller(import_checker(config.checker), config.delimiter) if config.checker else None
    output = Path(config.output)
    meta = output.with_name(output.name + ".settings.json")
    done = _done_ids(output, meta, _settings(config))
    output.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(_settings(config), indent=1))
    if generator is None:
        generator = _load_generator(config)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    labeller = None
    if config.rollouts:
        labeller = MonteCarloLabeller(
            generator, params, config.rollouts, config.delimiter, config.max_rows, config.keep_rollouts
        )
    chunks = range(0, len(records), config.batch_prompts)
    written = 0
    with output.open("a") as out:
        for c, start in enumerate(tqdm(chunks, desc="step labels", disable=not config.progress)):
            ids = range(start, min(start + config.batch_prompts, len(records)))
            if all(i in done for i in ids):
                continue
            seed = config.seed + 1_000_003 * c
            chunk = [records[i] for i in ids]
            solutions = generator.generate(
                [r["prompt"] for r in chunk], dataclasses.replace(params, seed=seed), n=config.samples_per_prompt
            )
            items = [(r["prompt"], str(r["answer"]), s.text) for r, group in zip(chunk, solutions) for s in group]
            if labeller is not None:
                labelled = labeller.label(items, seed=seed + 1)
            else:
                labelled = [
                    {
                        "prompt": p,
                        "answer": a,
                        "response": r,
                        "step_ends": step_ends(r, config.delimiter),
                        "outcome": int(is_correct(r, a)),
                        "rollouts": 0,
                    }
                    for p, a, r in items
                ]
            if checker is not None:
                checker.add_labels(labelled)
            for j, rec in enumerate(labelled):
                rec["id"] = ids[j // config.samples_per_prompt]
                out.write(json.dumps(rec) + "\n")
            out.flush()
            written += len(labelled)
    return {"written": written, "output": str(output), **label_summary(output)}


def label_summary(path: str | Path) -> dict[str, Any]:
    """Means of the labels in a step-label file (and, with checker labels, how often MC agrees)."""
    from fastpeft.training.data import load_records

    recs = load_records(str(path))
    steps = []
    for r in recs:
        n = len(r["step_ends"])
        steps += zip(r.get("soft", [None] * n), r.get("hard", [None] * n), r.get("checker", [None] * n))
    labelled = [(s, h) for s, h, _ in steps if s is not None]
    out: dict[str, Any] = {
        "records": len(recs),
        "prefixes": len(steps),
        "sampled_accuracy": sum(r["outcome"] for r in recs) / max(len(recs), 1),
        "soft_mean": sum(s for s, _ in labelled) / len(labelled) if labelled else None,
        "hard_mean": sum(h for _, h in labelled) / len(labelled) if labelled else None,
    }
    checked = [(h, c) for _, h, c in steps if c is not None and h is not None]
    if checked:
        out["hard_agrees_with_checker"] = sum(h == c for h, c in checked) / len(checked)
    return out


def _load_generator(config: StepLabelConfig) -> Generator:
    if config.model is None:
        raise ValueError("step-labels needs model (a local model directory) or a generator")
    import fastpeft
    from fastpeft.reasoning.sampler import Sampler
    from fastpeft.training.model_setup import load_saved_model, resolve_device

    model, tokenizer = load_saved_model(config.model)
    if config.adapter:
        fastpeft.load_adapter(model, config.adapter)
    model.to(resolve_device(config.device)).eval()
    return Sampler(model, tokenizer, max_seq_len=config.max_seq_len)


def outcome_records(records: Sequence[dict[str, Any]], delimiter: str = "; ") -> list[dict[str, Any]]:
    """Every full response in step-label records, with its outcome: each solution, and (with
    ``rollout_texts``) each prefix + rollout. Training data for ``objective="outcome"``."""
    out = []
    for rec in records:
        responses = [(rec["response"], rec["outcome"])]
        for i, texts in enumerate(rec.get("rollout_texts", [])):
            prefix = rec["response"][: rec["step_ends"][i]]
            responses += [(prefix + t, int(is_correct(prefix + t, rec["answer"]))) for t in texts]
        for response, outcome in responses:
            out.append(
                {
                    "prompt": rec["prompt"],
                    "answer": rec["answer"],
                    "response": response,
                    "step_ends": step_ends(response, delimiter),
                    "outcome": outcome,
                }
            )
    return out
