"""SFT data: load records, tokenize with completion-only labels, pack, and batch deterministically.

Records (one dict each) come from a JSONL/JSON file, a Hugging Face ``datasets`` dataset (optional
import) or a Python list, in one of three shapes:

- ``{"prompt": str, "completion": str}`` (optional ``"answer"`` for exact-match eval);
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered by the tokenizer's chat template;
- ``{"text": str}`` (every token is a target).

Labels are ``-100`` everywhere except the completion / assistant turns (``completion_only``), found
through the fast tokenizer's character offsets on the full text, so tokenization is that of the
whole string. Packing concatenates examples into rows of ``max_seq_len`` with positions that restart
at 0 for each example and a segment id per example (0 = padding); the attention built from them
never crosses an example boundary (see :mod:`fastpeft.training.losses`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100


def load_records(source: Any, split: str = "train") -> list[dict[str, Any]]:
    """Records from a list of dicts, a ``.jsonl``/``.json`` file, a ``datasets`` object, or a local
    directory saved with ``datasets`` (``save_to_disk``) or loadable by ``datasets.load_dataset``."""
    if isinstance(source, (list, tuple)):
        records = list(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data file {str(source)!r} does not exist")
        if path.suffix == ".jsonl":
            records = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{n}: invalid JSON ({err.msg})") from err
        elif path.suffix == ".json":
            records = json.loads(path.read_text())
            if isinstance(records, dict):
                records = records.get(split, records.get("data"))
        else:
            records = _load_hf_dataset(str(path), split)
    elif hasattr(source, "column_names") and hasattr(source, "__iter__"):  # a datasets.Dataset
        records = list(source)
    else:
        raise TypeError(f"cannot load records from {type(source).__name__}; pass a list, a path or a Dataset")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"data from {source if isinstance(source, (str, Path)) else 'list'} must be a list of records")
    return records


def _load_hf_dataset(path: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"{path!r} is a directory: reading it needs the optional `datasets` package") from err
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        ds = datasets.load_dataset(path)
    if hasattr(ds, "keys"):  # a DatasetDict
        if split not in ds:
            raise ValueError(f"dataset at {path!r} has splits {list(ds.keys())}, not {split!r}")
        ds = ds[split]
    return list(ds)


def mix_datasets(
    general: Sequence[dict],
    domain: Sequence[dict],
    general_fraction: float = 0.2,
    total: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Domain-adaptive mixture: ``general_fraction`` general-instruction records, the rest domain
    records (default 20/80), shuffled. ``total`` defaults to what the domain set supports without
    repeating: ``len(domain) / (1 - general_fraction)``. Sources are sampled without replacement
    while they last, then cycled."""
    if not 0.0 <= general_fraction <= 1.0:
        raise ValueError(f"general_fraction must be in [0, 1], got {general_fraction}")
    if total is None:
        total = round(len(domain) / (1 - general_fraction)) if general_fraction < 1 else len(general)
    n_general = round(total * general_fraction)
    n_domain = total - n_general
    for name, src, n in (("general", general, n_general), ("domain", domain, n_domain)):
        if n and not src:
            raise ValueError(f"the {name} dataset is empty but the mixture needs {n} records from it")
    rng = random.Random(seed)

    def take(src: Sequence[dict], n: int) -> list[dict]:
        out: list[dict] = []
        while len(out) < n:
            order = list(range(len(src)))
            rng.shuffle(order)
            out += [src[i] for i in order[: n - len(out)]]
        return out

    mixed = take(general, n_general) + take(domain, n_domain)
    rng.shuffle(mixed)
    return mixed


@dataclasses.dataclass
class Example:
    """One tokenized example: ``input_ids`` and ``labels`` (``-100`` = not a target), same length."""

    input_ids: list[int]
    labels: list[int]


def _assistant_spans(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (with its end
    marker), found by rendering growing prefixes of the conversation."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError("'messages' must be a list of {'role': str, 'content': str} objects")
    from jinja2.exceptions import TemplateError  # transformers renders chat templates with jinja2

    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as err:  # e.g. raise_exception for an unknown role
        raise ValueError(f"the chat template refused the conversation: {err}") from err
    spans = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError(
                "the tokenizer's chat template does not render conversations prefix by prefix; "
                "assistant-only labels cannot be located"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def _label_spans(
    text: str, spans: list[tuple[int, int]], tokenizer: Any, add_special_tokens: bool, completion_only: bool
) -> Example:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    labels = []
    for tok, (start, end) in zip(ids, offsets):
        inside = any(a <= start < b for a, b in spans) and end > start
        if completion_only:
            labels.append(tok if inside else IGNORE_INDEX)
        else:
            labels.append(tok if (end > start or tok not in special) else IGNORE_INDEX)
    return Example(list(ids), labels)


def tokenize_record(
    record: dict[str, Any],
    tokenizer: Any,
    max_seq_len: int,
    completion_only: bool = True,
    use_chat_template: bool = False,
) -> Example | None:
    """Tokenize one record; None when truncation to ``max_seq_len`` leaves no target token."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("fastpeft data needs a fast tokenizer (character offsets locate the targets)")
    eos = tokenizer.eos_token_id
    if "messages" in record:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("record has 'messages' but the tokenizer has no chat template")
        text, spans = _assistant_spans(record["messages"], tokenizer)
        ex = _label_spans(text, spans, tokenizer, add_special_tokens=False, completion_only=completion_only)
    elif "prompt" in record and "completion" in record:
        prompt, completion = str(record["prompt"]), str(record["completion"])
        if use_chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return tokenize_record({"messages": messages}, tokenizer, max_seq_len, completion_only)
        text = prompt + completion
        ex = _label_spans(text, [(len(prompt), len(text))], tokenizer, True, completion_only)
        if eos is not None:  # the model must learn to stop
            ex.input_ids.append(eos)
            ex.labels.append(eos)
    elif "text" in record:
        text = str(record["text"])
        ex = _label_spans(text, [(0, len(text))], tokenizer, True, completion_only)
        if eos is not None:
            ex.input_ids.append(eos)
            ex.labels.append(eos)
    else:
        raise ValueError(f"record with keys {sorted(record)} has none of 'messages', 'prompt'+'completion', 'text'")
    ex.input_ids, ex.labels = ex.input_ids[:max_seq_len], ex.labels[:max_seq_len]
    # the first token is never predicted (causal shift), so a record needs a target after it
    if all(label == IGNORE_INDEX for label in ex.labels[1:]):
        return None
    return ex


def tokenize_records(
    records: Iterable[dict],
    tokenizer: Any,
    max_seq_len: int,
    completion_only: bool = True,
    use_chat_template: bool = False,
) -> list[Example]:
    """Tokenize all records, warning once with the count of those dropped for lack of targets."""
    out, dropped = [], 0
    for rec in records:
        ex = tokenize_record(rec, tokenizer, max_seq_len, completion_only, use_chat_template)
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    if dropped:
        warnings.warn(f"dropped {dropped} records with no target tokens within max_seq_len={max_seq_len}", stacklevel=2)
    if not out:
        raise ValueError("no usable training records (all empty or truncated away)")
    return out


@dataclasses.dataclass
class Row:
    """One batch row: tokens, labels, per-token positions and segment ids (0 = padding)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    segment_ids: list[int]


def pack_examples(examples: Sequence[Example], max_seq_len: int) -> list[Row]:
    """Greedy in-order packing into rows of at most ``max_seq_len`` tokens. Each example keeps its
    own positions (0, 1, ...) and segment id; its first label is -100 because the token before it
    belongs to another example."""
    rows: list[Row] = []
    cur = Row([], [], [], [])
    for ex in examples:
        if len(ex.input_ids) > max_seq_len:
            raise ValueError(f"example of {len(ex.input_ids)} tokens exceeds max_seq_len={max_seq_len}")
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_seq_len:
            rows.append(cur)
            cur = Row([], [], [], [])
        seg = (cur.segment_ids[-1] if cur.segment_ids else 0) + 1
        cur.input_ids += ex.input_ids
        cur.labels += [IGNORE_INDEX] + ex.labels[1:]
        cur.position_ids += list(range(len(ex.input_ids)))
        cur.segment_ids += [seg] * len(ex.input_ids)
    if cur.input_ids:
        rows.append(cur)
    return rows


def unpacked_rows(examples: Sequence[Example]) -> list[Row]:
    """One row per example (padding is added per batch by :func:`collate`)."""
    return [Row(ex.input_ids, ex.labels, list(range(len(ex.input_ids))), [1] * len(ex.input_ids)) for ex in examples]


def collate(rows: Sequence[Row], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad rows into tensors ``[B, T]``: input_ids, labels, position_ids, segment_ids."""
    longest = max(len(r.input_ids) for r in rows)
    t = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    out = {
        k: torch.full((len(rows), t), fill, dtype=torch.long)
        for k, fill in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("position_ids", 0), ("segment_ids", 0))
    }
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        out["input_ids"][i, :n] = torch.tensor(r.input_ids)
        out["labels"][i, :n] = torch.tensor(r.labels)
        out["position_ids"][i, :n] = torch.tensor(r.position_ids)
        # padding continues the positions so unpacked rows look like plain right padding
        out["position_ids"][i, n:] = torch.arange(n, t) if r.position_ids == list(range(n)) else 0
        out["segment_ids"][i, :n] = torch.tensor(r.segment_ids)
    return out


class BatchPlan:
    """Which rows each optimizer step uses, as a pure function of the step: resuming at step ``s``
    replays exactly what an uninterrupted run would have seen.

    A global batch is ``micro_batch_size * grad_accum_steps * world_size`` rows, drawn from a
    permutation seeded by ``seed + epoch``; rank ``r`` takes its contiguous share and cuts it into
    ``grad_accum_steps`` micro-batches. The last incomplete global batch of an epoch is dropped.
    """

    def __init__(
        self,
        rows: Sequence[Row],
        micro_batch_size: int,
        grad_accum_steps: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.rows, self.mb, self.accum = list(rows), micro_batch_size, grad_accum_steps
        self.world, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.global_batch = micro_batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = len(self.rows) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data has {len(self.rows)} rows, fewer than one global batch of "
                f"{self.global_batch} (micro_batch_size x grad_accum_steps x world_size)"
            )
        self._perm_epoch, self._perm = -1, list(range(len(self.rows)))

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(len(self.rows), generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm

    def micro_batches(self, step: int) -> list[list[Row]]:
        """This rank's ``grad_accum_steps`` micro-batches for optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        share = self.mb * self.accum
        start = k * self.global_batch + self.rank * share
        idx = perm[start : start + share]
        return [[self.rows[i] for i in idx[j : j + self.mb]] for j in range(0, share, self.mb)]
