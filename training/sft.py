"""The lean SFT recipe: ``train(SFTConfig(...))`` for any causal LM, with fastpeft adapters
(``finetune="lora"`` / ``"qlora"``) or full fine-tuning (``"full"``).

One optimizer step = ``grad_accum_steps`` micro-batches on each of ``world_size`` ranks. The loss
of the step is Σ token losses / Σ target tokens over all of them (see
:mod:`fastpeft.training.losses`), so accumulation and DDP reproduce the single-process update.
A step whose loss or gradient norm is not finite is skipped with a warning (no optimizer or
scheduler update); more than ``max_bad_steps`` such steps stop the run. Checkpoints every
``save_every`` steps are atomic and ``resume=True`` continues exactly where the run stopped (same
data order, RNG, optimizer and scheduler state) from the newest checkpoint that passes its manifest
check (see :mod:`fastpeft.training.checkpoint`). Metrics go to ``<output_dir>/metrics.jsonl`` and, at the end,
``loss.png``. All of that is the shared recipe core (:mod:`~fastpeft.training.recipe`,
:mod:`~fastpeft.training.loop`); this file is the data and the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastpeft.training import distributed as dist_utils
from fastpeft.training.data import (
    BatchPlan,
    collate,
    load_records,
    mix_datasets,
    pack_examples,
    tokenize_records,
    unpacked_rows,
)
from fastpeft.training.evaluate import evaluate_loss, exact_match
from fastpeft.training.loop import Callback, RunResult, start_run
from fastpeft.training.losses import CausalLMLoss
from fastpeft.training.recipe import RecipeConfig, setup_run


@dataclasses.dataclass
class SFTConfig(RecipeConfig):
    """Supervised fine-tuning (``fastpeft sft``): the shared fields of :class:`RecipeConfig` plus these."""

    # domain-adaptive: general records mixed into train_data at general_fraction (20/80), and then
    # adapters default to the last 10% of blocks (lora.last_layers_fraction=0.1) unless lora says otherwise
    general_data: str | list | None = None
    general_fraction: float = 0.2
    packing: bool = False
    completion_only: bool = True
    loss_impl: str = "auto"
    loss_chunk_size: int | None = None
    eval_max_new_tokens: int = 64
    lr: float = 2e-4
    output_dir: str = "runs/sft"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.general_fraction < 1.0:
            raise ValueError(f"general_fraction must be in [0, 1), got {self.general_fraction}")


def _rows(records: list[dict], tokenizer: Any, config: SFTConfig) -> list:
    examples = tokenize_records(
        records, tokenizer, config.max_seq_len, config.completion_only, config.use_chat_template
    )
    return pack_examples(examples, config.max_seq_len) if config.packing else unpacked_rows(examples)


def _evaluate(
    loss_module: CausalLMLoss,
    model: nn.Module,
    tokenizer: Any,
    eval_rows: list,
    eval_records: list,
    config: SFTConfig,
    device: torch.device,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if eval_rows:
        out["eval_loss"] = evaluate_loss(
            loss_module,
            eval_rows,
            tokenizer.pad_token_id,
            config.eval_batch_size,
            device,
            config.packing,
            torch.bfloat16 if config.bf16 else None,
        )
    if any("answer" in r for r in eval_records):
        em = exact_match(
            model,
            tokenizer,
            eval_records,
            config.eval_match,
            config.eval_max_new_tokens,
            config.eval_batch_size,
            device,
            config.use_chat_template,
        )
        out["exact_match"] = em["exact_match"]
    return out


def train(
    config: SFTConfig, model: nn.Module | None = None, tokenizer: Any = None, callbacks: Sequence[Callback] = ()
) -> RunResult:
    """Run SFT as configured. ``model``/``tokenizer`` may be passed in (then ``config.model`` is not
    read); ``callbacks`` are called as ``cb(step, record)`` after every optimizer step."""
    lora = dict(config.lora)
    if config.general_data is not None and not {"last_layers_fraction", "layers_to_transform"} & set(lora):
        lora["last_layers_fraction"] = 0.1
    ctx = setup_run(config, model, tokenizer, lora)
    if config.train_data is None:
        raise ValueError("train_data is required")
    records = load_records(config.train_data)
    if config.general_data is not None:
        records = mix_datasets(load_records(config.general_data), records, config.general_fraction, seed=config.seed)
    rows = _rows(records, ctx.tokenizer, config)
    eval_records = load_records(config.eval_data) if config.eval_data is not None else []
    eval_records = eval_records[: config.eval_max_examples] if config.eval_max_examples else eval_records
    eval_rows = _rows(eval_records, ctx.tokenizer, config) if eval_records else []
    plan = BatchPlan(rows, config.micro_batch_size, config.grad_accum_steps, ctx.world_size, ctx.rank, config.seed)
    total = config.total_steps(plan.steps_per_epoch)

    loss_module = CausalLMLoss(ctx.model, config.loss_impl, config.loss_chunk_size)
    layout = {"rows": len(plan.rows), "global_batch_rows": plan.global_batch, "steps_per_epoch": plan.steps_per_epoch}
    run = start_run(
        ctx,
        config,
        "sft",
        loss_module,
        total,
        layout,
        callbacks=callbacks,
        start_record={"rows": len(rows), "loss_impl": loss_module.loss_impl},
    )
    evaluate = None
    if eval_rows or eval_records:

        def evaluate() -> dict[str, Any]:
            return _evaluate(loss_module, ctx.model, ctx.tokenizer, eval_rows, eval_records, config, ctx.device)

    run.evaluate_at_start(evaluate)
    pad = ctx.tokenizer.pad_token_id
    for step in run.steps():
        batches = [{k: v.to(ctx.device) for k, v in collate(mb, pad).items()} for mb in plan.micro_batches(step)]
        local = torch.tensor(
            [
                sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
                sum(int((b["segment_ids"] > 0).sum()) for b in batches),
            ],
            dtype=torch.float64,
        )
        n_targets, n_tokens = dist_utils.all_reduce_sum(local.to(ctx.device)).tolist()
        step_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for j, b in enumerate(batches):
            with run.micro_batch(last=j == len(batches) - 1):
                loss_sum, _ = run.runner(
                    b["input_ids"], b["labels"], b["position_ids"], b["segment_ids"], packed=config.packing
                )
                run.backward(loss_sum / max(n_targets, 1.0))
            step_loss += loss_sum.detach().double()
        loss = float(dist_utils.all_reduce_sum(step_loss)) / max(n_targets, 1.0)
        run.update(loss)
        run.count_tokens(int(n_tokens))
        run.end_step(step, {"loss": loss, "epoch": step / plan.steps_per_epoch}, evaluate)
    return run.finish(evaluate)
