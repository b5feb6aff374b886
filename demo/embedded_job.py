"""The embedded default job (``fastpeft`` with no arguments): QLoRA SFT that visibly works, on CPU,
in a few minutes, with nothing downloaded.

1. **Base model.** A small Llama (built from a config) with the bundled character tokenizer is
   pretrained (full fine-tuning, packed) on plain text of worked sums, ``"47+38: 7+8=15 write 5
   carry 1; 4+3+1=8; answer 85"``: it learns column addition as text, never the question format.
2. **Before.** The base is quantized to NF4 and given LoRA adapters (``fastpeft.inject`` with
   ``quantize="nf4"``; a new adapter is a no-op) and asked held-out questions in the instruction
   format ``"Q: 47+38=?\\nA:"``; exact match of the final ``answer N`` is ~0%: it does not
   understand the question and writes noise.
3. **SFT.** Only the adapters train (completion-only loss) on Q/A records whose answers restate the
   problem and end with ``answer N``. Exact match on the same held-out questions rises to ~85%:
   SFT teaches the format, the arithmetic comes from the base.

``--model DIR`` skips step 1 and fine-tunes a local Hugging Face model instead; ``--data FILE``
replaces the arithmetic records (prompt/completion/answer or chat records; the last
``eval_examples`` are held out). The adapter is saved under ``<output_dir>/sft/adapter``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from fastpeft.demo.arithmetic import make_arithmetic_dataset

_PATH = {"path": True}


@dataclasses.dataclass
class DemoConfig:
    model: str | None = dataclasses.field(default=None, metadata=_PATH)  # local HF dir: skip pretraining
    data: str | None = dataclasses.field(default=None, metadata=_PATH)  # JSONL for the SFT stage
    output_dir: str = "runs/demo"
    seed: int = 0
    digits: int = 2
    pretrain_examples: int = 6000
    pretrain_steps: int = 800
    pretrain_lr: float = 5e-3
    train_examples: int = 2000
    eval_examples: int = 200
    sft_steps: int = 200
    sft_lr: float = 1e-2
    lora_r: int = 16
    micro_batch_size: int = 8
    max_seq_len: int = 256
    max_new_tokens: int = 80
    eval_match: str = "answer"
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    threads: int | None = None  # None: the cores not already busy (1-minute load average), at least 1
    progress: bool = True

    def __post_init__(self) -> None:  # checked before minutes of pretraining, not after
        for name in (
            "digits",
            "pretrain_examples",
            "pretrain_steps",
            "pretrain_lr",
            "train_examples",
            "eval_examples",
            "sft_steps",
            "sft_lr",
            "lora_r",
            "micro_batch_size",
            "max_seq_len",
            "max_new_tokens",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "threads",
        ):
            value = getattr(self, name)
            if value is not None and not (0 < value < float("inf")):
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.eval_match not in ("answer", "exact"):
            raise ValueError(f"eval_match must be 'answer' or 'exact', got {self.eval_match!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}), "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})"
            )


def _say(msg: str) -> None:
    print(msg, flush=True)


def _pick_threads(requested: int | None) -> int:
    """Busy-waiting OpenMP threads on cores that other processes hold make small-tensor training
    several times slower, so by default use only the cores the load average leaves free."""
    if requested:
        return requested
    free = (os.cpu_count() or 1) - os.getloadavg()[0]
    return max(1, min(torch.get_num_threads(), int(free + 0.5)))


def _pretrain(config: DemoConfig, tokenizer: Any, held_out: set[str]) -> torch.nn.Module:
    from fastpeft.training.model_setup import build_model
    from fastpeft.training.sft import SFTConfig, train

    corpus = make_arithmetic_dataset(
        config.pretrain_examples, seed=config.seed + 1, digits=config.digits, exclude=held_out, restate=True
    )
    texts = [{"text": r["completion"].lstrip()} for r in corpus]  # "47+38: 7+8=15 ...; answer 85"
    model_config = dict(
        model_type="llama",
        hidden_size=config.hidden_size,
        intermediate_size=2 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=config.max_seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build_model(None, model_config, seed=config.seed)
    _say(
        f"[1/3] pretraining a {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k-parameter Llama on "
        f"{len(texts)} worked sums (plain text, full fine-tuning, {config.pretrain_steps} steps)"
    )
    result = train(
        SFTConfig(
            finetune="full",
            train_data=texts,
            max_steps=config.pretrain_steps,
            micro_batch_size=config.micro_batch_size,
            lr=config.pretrain_lr,
            warmup_steps=20,
            scheduler="cosine",
            packing=True,
            max_seq_len=config.max_seq_len,
            output_dir=str(Path(config.output_dir) / "pretrain"),
            progress=config.progress,
            log_every=25,
            seed=config.seed,
            plot=False,
        ),
        model=model,
        tokenizer=tokenizer,
    )
    _say(f"      loss {result.final_loss:.3f}, {result.tokens_per_s:,.0f} tokens/s, {result.train_seconds:.0f} s")
    return model


def _sft_records(config: DemoConfig) -> tuple[list[dict], list[dict]]:
    from fastpeft.training.data import load_records

    if config.data is not None:
        records = load_records(config.data)
        if len(records) <= config.eval_examples:
            raise ValueError(f"data has {len(records)} records; need more than eval_examples={config.eval_examples}")
        return records[: -config.eval_examples], records[-config.eval_examples :]
    eval_records = make_arithmetic_dataset(config.eval_examples, seed=config.seed + 1000, digits=config.digits)
    train_records = make_arithmetic_dataset(
        config.train_examples,
        seed=config.seed + 2,
        digits=config.digits,
        exclude={r["prompt"] for r in eval_records},
        restate=True,
    )
    return train_records, eval_records


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the three stages; returns the numbers it prints."""
    import fastpeft
    from fastpeft.training.checkpoint import check_output_dir
    from fastpeft.training.evaluate import exact_match
    from fastpeft.training.metrics import peak_memory_bytes
    from fastpeft.training.model_setup import build_model
    from fastpeft.training.sft import SFTConfig, train
    from fastpeft.training.tokenizer import load_tokenizer

    check_output_dir(Path(config.output_dir))
    torch.set_num_threads(_pick_threads(config.threads))
    _say(f"fastpeft demo: CPU threads {torch.get_num_threads()}, output in {config.output_dir}")
    start = time.perf_counter()
    train_records, eval_records = _sft_records(config)
    if config.model is not None:
        has_tok = any((Path(config.model) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = load_tokenizer(config.model if has_tok else None)
        model = build_model(config.model, None)
        _say(f"[1/3] using the local model {config.model} (no pretraining)")
    else:
        tokenizer = load_tokenizer(None)
        held_out = {r["prompt"] for r in eval_records}
        model = _pretrain(config, tokenizer, held_out)
    fastpeft.inject(
        model,
        fastpeft.LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules="all-linear", quantize="nf4"),
    )
    report = fastpeft.trainable_parameters(model)
    em_kwargs = dict(match=config.eval_match, max_new_tokens=config.max_new_tokens, batch_size=200)
    before = exact_match(model, tokenizer, eval_records, **em_kwargs)
    _say(
        f"[2/3] NF4 base + LoRA r={config.lora_r} ({report.trainable:,} trainable of {report.total:,}): "
        f"exact match before SFT {before['exact_match']:.1%} on {before['n']} held-out questions"
    )
    _say(f"      e.g. {before['samples'][0][0]!r} -> {before['samples'][0][1]!r}")
    _say(f"[3/3] QLoRA SFT on {len(train_records)} Q/A records, completion-only loss, {config.sft_steps} steps")
    result = train(
        SFTConfig(
            finetune="qlora",
            train_data=train_records,
            max_steps=config.sft_steps,
            micro_batch_size=config.micro_batch_size,
            lr=config.sft_lr,
            warmup_steps=10,
            scheduler="cosine",
            packing=True,
            max_seq_len=config.max_seq_len,
            output_dir=str(Path(config.output_dir) / "sft"),
            progress=config.progress,
            log_every=25,
            seed=config.seed,
        ),
        model=model,
        tokenizer=tokenizer,
    )
    after = exact_match(model, tokenizer, eval_records, **em_kwargs)
    summary = {
        "exact_match_before": before["exact_match"],
        "exact_match_after": after["exact_match"],
        "eval_questions": after["n"],
        "sft_tokens_per_s": result.tokens_per_s,
        "peak_memory_bytes": peak_memory_bytes(),
        "adapter": str(result.saved),
        "total_seconds": time.perf_counter() - start,
        "sample": after["samples"][0] if after["samples"] else None,
    }
    _say(f"      e.g. {after['samples'][0][0]!r} -> {after['samples'][0][1]!r}")
    _say("")
    _say(f"exact match: {before['exact_match']:.1%} -> {after['exact_match']:.1%} ({after['n']} held-out questions)")
    _say(
        f"SFT throughput: {result.tokens_per_s:,.0f} tokens/s; peak memory (RSS): "
        f"{summary['peak_memory_bytes'] / 2**20:,.0f} MiB; total {summary['total_seconds']:.0f} s"
    )
    _say(f"adapter saved to {result.saved}; metrics and loss curve in {result.output_dir}")
    return summary
