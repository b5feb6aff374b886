"""Process and outcome reward models trained on step labels (the reward recipe's ``objective``).

Both are a LoRA/QLoRA adapter plus the scalar head of
:class:`~fastpeft.training.reward_model.ScalarHeadModel`, read at *step-boundary tokens*: the last
token of ``prompt + response[:end]`` for each prefix end of a step-label record
(:mod:`fastpeft.training.step_labels`), the bare prompt included. So the score of any text is the
head at its last token, and one forward over a whole response gives every step's score.

- ``objective="process"`` (PRM): binary cross-entropy at every boundary against the record's
  ``label_key`` labels (``soft`` Monte Carlo values by default, or ``hard`` / ``checker``):

      L = −(1/|S|) Σ_{(b, i) ∈ S} [ y_bi log σ(r_bi) + (1 − y_bi) log(1 − σ(r_bi)) ]

  σ(r) at a prefix then estimates the probability that the policy finishes it correctly: a value
  for step-level search, and at the bare prompt a difficulty estimate.
- ``objective="outcome"`` (ORM, Cobbe et al. 2021): the same loss at the last boundary only,
  against the record's ``outcome``.

Held-out metrics (:func:`evaluate_labels`): loss; step accuracy and AUC at the intermediate
boundaries against the ``checker`` labels when the records have them (else ``hard``); outcome
accuracy at the last boundary; and pairwise accuracy over every (right, wrong) pair of responses to
the same prompt, ranked by the last-boundary score (ties count half).

:class:`StepScorer` serves a trained model to search: ``score`` / ``score_batch`` (the
:class:`~fastpeft.reasoning.types.Scorer` protocol), ``step_scores``, ``prompt_score``; it routes
its rows to its adapter with :func:`fastpeft.route_adapters`, so it can share one model (one NF4
base in memory) with the policy adapter the sampler runs.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.training import distributed as dist_utils
from fastpeft.training.data import BatchPlan, load_records
from fastpeft.training.logprobs import backbone_hidden
from fastpeft.training.loop import Callback, start_run
from fastpeft.training.recipe import setup_run
from fastpeft.training.reward_model import HEAD_FILE, RewardConfig, RewardResult, ScalarHeadModel

OBJECTIVES = ("process", "outcome")
LABEL_KEYS = ("soft", "hard", "checker")


@dataclasses.dataclass
class LabelRow:
    """One tokenized step-label record: boundary token indices and their targets."""

    index: int  # record index
    input_ids: list[int]
    positions: list[int]  # boundary token index per kept prefix
    targets: list[float]  # the training target at each position
    truth: list[int | None]  # per position: checker (else hard) label; None for the bare prompt
    outcome: int
    prompt: str


def boundary_positions(tokenizer: Any, text: str, char_ends: Sequence[int]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and, for each character offset in ``char_ends``, the index of the last
    token that starts before it (the token holding character ``end - 1``)."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    starts = [a for a, _ in offsets]
    positions = []
    for end in char_ends:
        if not 0 < end <= len(text):
            raise ValueError(f"boundary {end} is outside the text (length {len(text)})")
        positions.append(bisect.bisect_left(starts, end) - 1)
    return ids, positions


def tokenize_label_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_len: int,
    objective: str = "process",
    label_key: str = "soft",
) -> list[LabelRow]:
    """Step-label records -> :class:`LabelRow` (boundaries past ``max_seq_len`` are dropped)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if label_key not in LABEL_KEYS:
        raise ValueError(f"label_key must be one of {LABEL_KEYS}, got {label_key!r}")
    rows = []
    for i, rec in enumerate(records):
        missing = [k for k in ("prompt", "response", "step_ends", "outcome") if k not in rec]
        if objective == "process" and label_key not in rec:
            missing.append(label_key)
        if missing:
            raise ValueError(f"step-label record {i} lacks {missing} (keys: {sorted(rec)})")
        prompt, ends = str(rec["prompt"]), list(rec["step_ends"])
        labels = rec.get(label_key, [])
        if objective == "process" and len(labels) != len(ends):
            raise ValueError(f"record {i}: {len(labels)} {label_key!r} labels for {len(ends)} step_ends")
        truth_key = "checker" if "checker" in rec else "hard"
        ids, positions = boundary_positions(tokenizer, prompt + rec["response"], [len(prompt) + e for e in ends])
        keep = [j for j, p in enumerate(positions) if p < max_seq_len]
        if objective == "outcome":
            keep = [len(ends) - 1] if keep and keep[-1] == len(ends) - 1 else []
            targets = [float(rec["outcome"])]
        else:
            targets = [float(labels[j]) for j in keep]
        if not keep:
            continue
        truth = [None if ends[j] == 0 else int(rec[truth_key][j]) if truth_key in rec else None for j in keep]
        rows.append(
            LabelRow(i, ids[:max_seq_len], [positions[j] for j in keep], targets, truth, int(rec["outcome"]), prompt)
        )
    if not rows:
        raise ValueError("no usable step-label records")
    return rows


def collate_label_rows(rows: Sequence[LabelRow], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``position_ids`` ``[B, T]`` plus the flattened
    boundaries: ``row``/``pos`` (int64) and ``target`` (fp32), one entry per boundary."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[b, : len(r.input_ids)] = 1
    row = torch.tensor([b for b, r in enumerate(rows) for _ in r.positions])
    pos = torch.tensor([p for r in rows for p in r.positions])
    target = torch.tensor([t for r in rows for t in r.targets], dtype=torch.float32)
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": torch.arange(width).expand(len(rows), -1),
        "row": row,
        "pos": pos,
        "target": target,
    }
    return {k: v.to(device) for k, v in out.items()}


def boundary_logits(scores: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Head outputs ``[B, T]`` -> the logits at every boundary ``[S]``."""
    return scores[batch["row"], batch["pos"]]


def step_label_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy with (soft) targets in [0, 1] (module docstring formula)."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    if bool(((targets < 0) | (targets > 1)).any()):
        raise ValueError("step-label targets must be in [0, 1]")
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction=reduction)


def auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Probability that a random positive outscores a random negative (ties half); None without both."""
    pos = sorted(s for s, y in zip(scores, labels) if y)
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = 0.0
    for s in neg:
        below, above = bisect.bisect_left(pos, s), bisect.bisect_right(pos, s)
        wins += (len(pos) - above) + 0.5 * (above - below)
    return wins / (len(pos) * len(neg))


def pairwise_accuracy(final_scores: Sequence[float], outcomes: Sequence[int], prompts: Sequence[str]) -> dict[str, Any]:
    """Accuracy over every (right, wrong) pair of responses to the same prompt (ties count half)."""
    groups: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for s, y, p in zip(final_scores, outcomes, prompts):
        groups[p].append((s, y))
    wins = pairs = 0.0
    for items in groups.values():
        for sr, yr in items:
            if not yr:
                continue
            for sw, yw in items:
                if not yw:
                    pairs += 1
                    wins += 1.0 if sr > sw else 0.5 if sr == sw else 0.0
    return {"pairwise_accuracy": wins / pairs if pairs else None, "pairs": int(pairs)}


@torch.no_grad()
def evaluate_labels(
    model: ScalarHeadModel,
    rows: Sequence[LabelRow],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    adapter: str | None = None,
) -> dict[str, Any]:
    """Held-out loss, step accuracy / AUC, outcome accuracy and pairwise accuracy (module docstring).

    ``adapter``: route every row through that adapter (a reward model sharing its base with others).
    """
    was = model.training
    model.eval()
    logits, targets = [], []
    try:
        for i in range(0, len(rows), batch_size):
            b = collate_label_rows(rows[i : i + batch_size], pad_id, device)
            with _routed(model.lm, adapter, b["input_ids"].shape[0]):
                scores = model(b["input_ids"], b["attention_mask"], b["position_ids"])
            logits.append(boundary_logits(scores, b))
            targets.append(b["target"])
    finally:
        model.train(was)
    z, y = torch.cat(logits).float(), torch.cat(targets)
    probs = torch.sigmoid(z).tolist()
    flat = [(p, t) for r in rows for p, t in zip(r.positions, r.truth)]
    step = [(s, t) for s, (_, t) in zip(probs, flat) if t is not None]
    ends = torch.tensor([len(r.positions) for r in rows]).cumsum(0) - 1
    finals = [probs[e] for e in ends.tolist()]
    outcomes = [r.outcome for r in rows]
    out = {
        "eval_loss": float(step_label_loss(z, y)),
        "eval_boundaries": len(probs),
        "eval_outcome_accuracy": sum((f >= 0.5) == bool(o) for f, o in zip(finals, outcomes)) / len(rows),
    }
    if step:
        out["eval_step_accuracy"] = sum((s >= 0.5) == bool(t) for s, t in step) / len(step)
        out["eval_step_auc"] = auc([s for s, _ in step], [t for _, t in step])
    pw = pairwise_accuracy(finals, outcomes, [r.prompt for r in rows])
    out["eval_pairwise_accuracy"], out["eval_pairs"] = pw["pairwise_accuracy"], pw["pairs"]
    return out


def _routed(lm: nn.Module, adapter: str | None, rows: int) -> contextlib.AbstractContextManager:
    if adapter is None:
        return contextlib.nullcontext()
    import fastpeft

    return fastpeft.route_adapters(lm, [adapter] * rows)


def train_on_labels(
    config: RewardConfig, model: nn.Module | None = None, tokenizer: Any = None, callbacks: Sequence[Callback] = ()
) -> RewardResult:
    """The reward recipe for ``objective`` ``process`` / ``outcome`` (see the module docstring), on
    the recipes' one loop (:mod:`fastpeft.training.loop`)."""
    ctx = setup_run(config, model, tokenizer)
    rm = ScalarHeadModel(ctx.model)
    rm.train()
    if config.train_data is None:
        raise ValueError("train_data is required (step-label records, see fastpeft.training.step_labels)")
    pad = ctx.tokenizer.pad_token_id or 0

    def tokenize(source: Any) -> list[LabelRow]:
        return tokenize_label_records(
            load_records(source), ctx.tokenizer, config.max_seq_len, config.objective, config.label_key
        )

    rows = tokenize(config.train_data)
    eval_rows = tokenize(config.eval_data) if config.eval_data is not None else []
    plan = BatchPlan(rows, config.micro_batch_size, config.grad_accum_steps, ctx.world_size, ctx.rank, config.seed)
    layout = {"records": len(rows), "global_batch_records": plan.global_batch}
    run = start_run(
        ctx,
        config,
        f"reward/{config.objective}",
        rm,
        config.total_steps(plan.steps_per_epoch),
        layout,
        saved_module=rm,
        find_unused=config.finetune == "full",
        callbacks=callbacks,  # the LM head is unused
        start_record={"records": len(rows)},
    )
    evaluate = None
    if eval_rows:

        def evaluate() -> dict[str, Any]:
            return evaluate_labels(rm, eval_rows, pad, config.eval_batch_size, ctx.device)

    run.evaluate_at_start(evaluate)
    for step in run.steps():
        micro = plan.micro_batches(step)
        local = float(sum(len(r.positions) for m in micro for r in m))
        count = float(dist_utils.all_reduce_sum(torch.tensor(local, device=ctx.device)))  # boundaries, every rank
        step_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for j, mb in enumerate(micro):
            b = collate_label_rows(mb, pad, ctx.device)
            with run.micro_batch(last=j == len(micro) - 1):
                logits = boundary_logits(run.runner(b["input_ids"], b["attention_mask"], b["position_ids"]), b)
                loss = step_label_loss(logits, b["target"], reduction="sum")
                run.backward(loss / count)
            step_loss += loss.detach().double()
            run.count_tokens(int(b["attention_mask"].sum()))
        loss_value = float(dist_utils.all_reduce_sum(step_loss)) / count
        run.update(loss_value)
        run.end_step(step, {"loss": loss_value}, evaluate)
    result = run.finish(evaluate, rm.head_state, HEAD_FILE)
    return RewardResult(**{f.name: getattr(result, f.name) for f in dataclasses.fields(result)}, model=rm)


class StepScorer:
    """A trained PRM / ORM for search: σ(head) at the last token of ``prompt + text``.

    ``adapter``: the adapter this model's rows run through (``fastpeft.route_adapters``), so the
    same model can hold the policy adapter and several verifier adapters on one base; None runs
    the model as it is. Scores are cached per text (step-level search asks again for each prefix).
    """

    def __init__(
        self,
        model: ScalarHeadModel,
        tokenizer: Any,
        adapter: str | None = None,
        max_seq_len: int = 512,
        batch_size: int = 64,
        delimiter: str = "; ",
        cache_size: int = 1 << 16,
    ):
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.max_seq_len, self.batch_size, self.delimiter = max_seq_len, batch_size, delimiter
        self._cache: dict[str, float] = {}
        self._cache_size = cache_size
        self.forward_rows = 0  # rows scored by a forward pass (cache misses), for the cost reports

    def _route(self, rows: int) -> contextlib.AbstractContextManager:
        return _routed(self.model.lm, self.adapter, rows)

    @torch.no_grad()
    def _forward(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[list[float]]:
        """σ(head) at the given positions of each token-id row, in batches."""
        device = self.model.head.weight.device
        out: list[list[float]] = []
        was = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(encoded), self.batch_size):
                chunk = encoded[i : i + self.batch_size]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for b, (row, _) in enumerate(chunk):
                    ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
                ids, mask = ids.to(device), mask.to(device)
                with self._route(len(chunk)):
                    hidden = backbone_hidden(self.model.lm, ids, mask, torch.arange(width, device=device)[None])
                    probs = torch.sigmoid(self.model.head(hidden.float()).squeeze(-1))
                out += [probs[b, pos].tolist() for b, (_, pos) in enumerate(chunk)]
                self.forward_rows += len(chunk)
        finally:
            self.model.train(was)
        return out

    def _encode(self, text: str, char_ends: Sequence[int]) -> tuple[list[int], list[int]]:
        ids, positions = boundary_positions(self.tokenizer, text, char_ends)
        if len(ids) > self.max_seq_len:
            raise ValueError(f"text of {len(ids)} tokens is longer than max_seq_len={self.max_seq_len}")
        return ids, positions

    def score_batch(self, prompt: str, responses: Sequence[str]) -> list[float]:
        """σ(head) at the last token of ``prompt + response`` for each response (one batched pass)."""
        texts = [prompt + r for r in responses]
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            for text, (value,) in zip(todo, self._forward([self._encode(t, [len(t)]) for t in todo])):
                if len(self._cache) >= self._cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[text] = value
        return [self._cache[t] for t in texts]

    def score(self, prompt: str, response: str) -> float:
        return self.score_batch(prompt, [response])[0]

    def prompt_score(self, prompt: str) -> float:
        """The value of the bare question (a PRM trained with the empty prefix: its pass rate)."""
        return self.score_batch(prompt, [""])[0]

    def step_scores(self, prompt: str, response: str) -> list[float]:
        """σ(head) at every step boundary of ``response`` (one forward; the bare prompt excluded)."""
        from fastpeft.training.step_labels import step_ends

        ends = [len(prompt) + e for e in step_ends(response, self.delimiter)[1:]]
        return self._forward([self._encode(prompt + response, ends)])[0] if ends else []


def load_step_scorer(
    lm: nn.Module,
    directory: str | Path,
    tokenizer: Any,
    adapter_name: str = "prm",
    quantize: str | None = "nf4",
    **scorer_options: Any,
) -> StepScorer:
    """A saved PRM / ORM (adapter + ``score_head.safetensors`` in ``directory``) loaded into ``lm``
    as ``adapter_name`` beside the adapters ``lm`` already has (the active one stays active).

    ``quantize="nf4"`` quantizes a dense base while loading (as ``finetune="qlora"`` trained it);
    a base that is already NF4 keeps its weights.
    """
    import fastpeft

    overrides = {"quantize": quantize} if quantize else {}
    fastpeft.load_adapter(lm, directory, adapter_name=adapter_name, activate=False, **overrides)
    rm = ScalarHeadModel(lm)
    rm.load_head(directory)
    return StepScorer(rm, tokenizer, adapter=adapter_name, **scorer_options)
