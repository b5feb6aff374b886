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
``loss.png``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fastpeft.training import checkpoint as ckpt
from fastpeft.training import distributed as dist_utils
from fastpeft.training.config_checks import check_training_fields
from fastpeft.training.data import BatchPlan, collate, load_records, mix_datasets, pack_examples, tokenize_records, unpacked_rows
from fastpeft.training.evaluate import evaluate_loss, exact_match
from fastpeft.training.losses import CausalLMLoss
from fastpeft.training.metrics import MetricsLogger, Throughput, peak_memory_bytes, plot_loss_curve, progress_bar
from fastpeft.training.model_setup import (apply_finetune_mode, build_model, build_optimizer, build_scheduler,
                                           resolve_device)  # fmt: skip
from fastpeft.training.step_design import StepDesign, apply_step_design
from fastpeft.training.tokenizer import load_tokenizer

_PATH = {"path": True}  # fields checked for existence when read from YAML / the command line


@dataclasses.dataclass
class SFTConfig:
    """Everything a run needs; YAML keys and ``--key value`` overrides use these names."""

    # model and tokenizer (no downloads: a local directory, or a config dict to build from)
    model: str | None = dataclasses.field(default=None, metadata=_PATH)
    model_config: dict | None = None
    tokenizer: str | None = dataclasses.field(default=None, metadata=_PATH)  # default: model dir or bundled
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str = "auto"
    # what trains
    finetune: Literal["lora", "qlora", "full"] = "lora"
    lora: dict = dataclasses.field(default_factory=dict)  # fastpeft.LoraConfig fields
    # data: a JSONL/JSON path, a datasets directory, or a list of records
    train_data: str | list | None = None
    eval_data: str | list | None = None
    # domain-adaptive: general records mixed into train_data at general_fraction (20/80), and then
    # adapters default to the last 10% of blocks (lora.last_layers_fraction=0.1) unless lora says otherwise
    general_data: str | list | None = None
    general_fraction: float = 0.2
    max_seq_len: int = 512
    packing: bool = False
    completion_only: bool = True
    use_chat_template: bool = False
    # optimization
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    scheduler: str = "linear"
    warmup_steps: int = 0
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int | None = None
    num_epochs: float = 1.0
    max_grad_norm: float | None = 1.0  # null: no clipping
    bf16: bool = False
    gradient_checkpointing: bool = False
    # memory (fastpeft.training.step_design): block inputs in host memory; MLP over row tiles; lean norms
    offload_activations: bool = False
    mlp_tile_rows: int | None = None
    lean_norms: bool = False
    loss_impl: str = "auto"
    loss_chunk_size: int | None = None
    max_bad_steps: int = 10
    seed: int = 0
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several ranks; see fastpeft.training.distributed
    # evaluation
    eval_every: int | None = None
    eval_batch_size: int = 64
    eval_match: Literal["answer", "exact"] = "exact"
    eval_max_new_tokens: int = 64
    eval_max_examples: int | None = 200
    # output
    output_dir: str = "runs/sft"
    save_every: int | None = None
    keep_checkpoints: int | None = 2  # the newest N; null or 0: all
    resume: bool = False
    log_every: int = 10
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        check_training_fields(self)
        if not 0.0 <= self.general_fraction < 1.0:
            raise ValueError(f"general_fraction must be in [0, 1), got {self.general_fraction}")
        StepDesign(self.gradient_checkpointing, self.offload_activations, self.mlp_tile_rows, self.lean_norms)  # checks
        if self.parallel not in dist_utils.PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {dist_utils.PARALLEL_MODES}, got {self.parallel!r}")
        if self.parallel == "fsdp" and self.optimizer not in dist_utils.FSDP_OPTIMIZERS:
            raise ValueError(f"parallel='fsdp' shards parameters into DTensors, which optimizer={self.optimizer!r} "
                             f"cannot update; use one of {dist_utils.FSDP_OPTIMIZERS}")  # fmt: skip


@dataclasses.dataclass
class SFTResult:
    steps: int
    final_loss: float | None
    eval: dict[str, Any]
    output_dir: Path
    saved: Path | None  # adapter directory (adapters) or model directory (full fine-tuning)
    tokens_per_s: float
    peak_memory_bytes: int
    train_seconds: float


def _default_tokenizer_path(config: SFTConfig) -> str | None:
    if config.tokenizer:
        return config.tokenizer
    if config.model and any((Path(config.model) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return config.model
    return None


def _rows(records: list[dict], tokenizer: Any, config: SFTConfig) -> list:
    examples = tokenize_records(records, tokenizer, config.max_seq_len, config.completion_only,
                                config.use_chat_template)  # fmt: skip
    return pack_examples(examples, config.max_seq_len) if config.packing else unpacked_rows(examples)


def _evaluate(loss_module: CausalLMLoss, model: nn.Module, tokenizer: Any, eval_rows: list, eval_records: list,
              config: SFTConfig, device: torch.device, amp: torch.dtype | None) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    if eval_rows:
        out["eval_loss"] = evaluate_loss(loss_module, eval_rows, tokenizer.pad_token_id, config.eval_batch_size,
                                         device, config.packing, amp)  # fmt: skip
    if any("answer" in r for r in eval_records):
        em = exact_match(model, tokenizer, eval_records, config.eval_match, config.eval_max_new_tokens,
                         config.eval_batch_size, device, config.use_chat_template)  # fmt: skip
        out["exact_match"] = em["exact_match"]
    return out


def train(config: SFTConfig, model: nn.Module | None = None, tokenizer: Any = None,
          callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = ()) -> SFTResult:  # fmt: skip
    """Run SFT as configured. ``model``/``tokenizer`` may be passed in (then ``config.model`` is not
    read); ``callbacks`` are called as ``cb(step, record)`` after every optimizer step."""
    rank, local_rank, world_size = dist_utils.world()
    if rank == 0:  # before anything is loaded: an unusable output_dir would lose the trained weights
        ckpt.check_output_dir(Path(config.output_dir), "adapter", "model", "checkpoints")
    device = resolve_device(config.device, local_rank)
    distributed = dist_utils.init_distributed(device)
    main = rank == 0
    torch.manual_seed(config.seed)
    tokenizer = tokenizer or load_tokenizer(_default_tokenizer_path(config))
    if model is None:
        model = build_model(config.model, config.model_config, config.dtype, config.attn_implementation, config.seed)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                         f"{model.get_input_embeddings().num_embeddings}")  # fmt: skip
    lora = dict(config.lora)
    if config.general_data is not None and not {"last_layers_fraction", "layers_to_transform"} & set(lora):
        lora["last_layers_fraction"] = 0.1
    has_adapters = apply_finetune_mode(model, config.finetune, lora)
    model.to(device)
    apply_step_design(model, StepDesign(config.gradient_checkpointing, config.offload_activations,
                                        config.mlp_tile_rows, config.lean_norms))  # fmt: skip
    model.train()

    if config.train_data is None:
        raise ValueError("train_data is required")
    records = load_records(config.train_data)
    if config.general_data is not None:
        records = mix_datasets(load_records(config.general_data), records, config.general_fraction, seed=config.seed)
    rows = _rows(records, tokenizer, config)
    eval_records = load_records(config.eval_data) if config.eval_data is not None else []
    eval_records = eval_records[: config.eval_max_examples] if config.eval_max_examples else eval_records
    eval_rows = _rows(eval_records, tokenizer, config) if eval_records else []
    plan = BatchPlan(rows, config.micro_batch_size, config.grad_accum_steps, world_size, rank, config.seed)
    total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * plan.steps_per_epoch))

    loss_module = CausalLMLoss(model, config.loss_impl, config.loss_chunk_size)
    runner: nn.Module = loss_module
    if distributed:  # FSDP2 shards loss_module in place (and replaces its parameters): before the optimizer
        runner = dist_utils.wrap_for_training(loss_module, config.parallel, device, bool(eval_rows or eval_records))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optimizer, params, config.lr, config.weight_decay, tuple(config.adam_betas),
                                config.adam_eps, device)  # fmt: skip
    scheduler = build_scheduler(config.scheduler, optimizer, config.warmup_steps, total_steps)
    amp = torch.bfloat16 if config.bf16 else None

    out_dir = Path(config.output_dir)
    ckpt_root = out_dir / "checkpoints"
    start_step, bad_steps = 0, 0
    resume_from = ckpt.resume_checkpoint(ckpt_root) if config.resume else None
    layout = {"rows": len(plan.rows), "global_batch_rows": plan.global_batch, "steps_per_epoch": plan.steps_per_epoch}
    if resume_from is not None:
        trainer_state = ckpt.read_trainer_state(resume_from)
        saved = trainer_state.get("data_position", {})
        if {k: saved.get(k) for k in layout} != layout:
            raise ValueError(f"checkpoint {resume_from} was written for data layout {saved}, this run has "
                             f"{layout}; resuming would not replay the same batches")  # fmt: skip
        ckpt.warn_config_changes(resume_from, trainer_state.get("config", {}), _jsonable_config(config))
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, rank)
        start_step, bad_steps = state["step"], state["bad_steps"]
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(out_dir / "metrics.jsonl", start_step if resume_from else None, enabled=main)
    logger.log({"event": "start", "step": start_step, "total_steps": total_steps, "rows": len(rows),
                "world_size": world_size, "loss_impl": loss_module.loss_impl, "finetune": config.finetune,
                "trainable_params": sum(p.numel() for p in params), "device": str(device)})  # fmt: skip

    # DDP: rank 0 evaluates alone. FSDP: every rank evaluates the gathered model, because transformers'
    # generate sees an FSDP-managed model and keeps the ranks' decoding steps in sync (all_reduce)
    evaluates = main or dist_utils.is_fsdp(runner)
    bar = progress_bar(total_steps, start_step, enabled=main and config.progress)
    meter, run_meter, t0 = Throughput(), Throughput(), time.perf_counter()
    last_loss, record = None, {}
    for step in range(start_step, total_steps):
        batches = [{k: v.to(device) for k, v in collate(mb, tokenizer.pad_token_id).items()}
                   for mb in plan.micro_batches(step)]  # fmt: skip
        local = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
                              sum(int((b["segment_ids"] > 0).sum()) for b in batches)], dtype=torch.float64)  # fmt: skip
        n_targets, n_tokens = dist_utils.all_reduce_sum(local.to(device)).tolist()
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for j, b in enumerate(batches):
            sync = j == len(batches) - 1 or not distributed
            with dist_utils.gradient_sync(runner, sync):
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss_sum, _ = runner(b["input_ids"], b["labels"], b["position_ids"], b["segment_ids"],
                                         packed=config.packing)  # fmt: skip
                # DDP and FSDP average gradients over ranks, hence the world_size factor
                (loss_sum * (world_size / max(n_targets, 1.0))).backward()
            step_loss += loss_sum.detach().double()
        loss = float(dist_utils.all_reduce_sum(step_loss)) / max(n_targets, 1.0)
        max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
        grad_norm = dist_utils.clip_grad_norm(params, max_norm)
        record = {"step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "epoch": step / plan.steps_per_epoch}  # fmt: skip
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            bad_steps += 1
            optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"step {step + 1}: non-finite loss ({loss}) or grad norm ({grad_norm}); step skipped "
                          f"({bad_steps}/{config.max_bad_steps})", stacklevel=2)  # fmt: skip
            record.update(skipped="non-finite", bad_steps=bad_steps)
            if bad_steps > config.max_bad_steps:
                logger.log(record)
                raise RuntimeError(f"more than max_bad_steps={config.max_bad_steps} non-finite steps; stopping")
        else:
            optimizer.step()
            scheduler.step()
            last_loss = loss
        meter.add(int(n_tokens))
        run_meter.add(int(n_tokens))
        if skipped or (step + 1) % config.log_every == 0 or step + 1 == total_steps:
            record.update(tokens_per_s=meter.rate(), peak_memory_bytes=peak_memory_bytes(device))
            logger.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total_steps:
            with dist_utils.full_parameters(runner, for_forward=True):
                if evaluates:
                    logger.log({"step": step + 1, **_evaluate(loss_module, model, tokenizer, eval_rows, eval_records,
                                                              config, device, amp)})  # fmt: skip
            dist_utils.barrier()
        if config.save_every and (step + 1) % config.save_every == 0:
            position = {**layout, "epoch": (step + 1) // plan.steps_per_epoch,
                        "batch_in_epoch": (step + 1) % plan.steps_per_epoch}  # fmt: skip
            _save_checkpoint(ckpt_root, step + 1, bad_steps, position, runner, model, optimizer, scheduler, config,
                             has_adapters, rank)  # fmt: skip
        for cb in callbacks:
            cb(step + 1, record)
    bar.close()
    train_seconds = time.perf_counter() - t0
    tokens_per_s = run_meter.rate()

    final_eval, saved = {}, None
    # FSDP: every rank gathers the whole model; rank 0 saves full tensors, the same files as under DDP
    full_state = None if has_adapters else dist_utils.full_model_state(model)
    with dist_utils.full_parameters(runner, for_forward=bool(eval_rows or eval_records)):
        if evaluates:
            final_eval = _evaluate(loss_module, model, tokenizer, eval_rows, eval_records, config, device, amp)
        if main:
            logger.log({"step": total_steps, "event": "end", **final_eval, "tokens_per_s": tokens_per_s,
                        "peak_memory_bytes": peak_memory_bytes(device), "train_seconds": train_seconds})  # fmt: skip
            saved = _save_final(model, tokenizer, out_dir, has_adapters, full_state)
            if config.plot:
                plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss.png")
    dist_utils.barrier()
    return SFTResult(total_steps, last_loss, final_eval, out_dir, saved, tokens_per_s, peak_memory_bytes(device),
                     train_seconds)  # fmt: skip


def _save_checkpoint(root: Path, step: int, bad_steps: int, position: dict[str, int], runner: nn.Module,
                     model: nn.Module, optimizer: Any, scheduler: Any, config: SFTConfig, has_adapters: bool,
                     rank: int) -> None:  # fmt: skip
    tmp = ckpt.begin_checkpoint(root, step) if rank == 0 else None
    tmp = Path(dist_utils.broadcast_object(str(tmp) if tmp else None))
    dist_utils.barrier()  # the directory exists before other ranks write into it
    ckpt.write_rank_state(tmp, rank)
    # FSDP: all ranks take part in gathering the sharded state; rank 0 writes the same files as DDP
    optimizer_state = dist_utils.full_optimizer_state(optimizer, keep=rank == 0)
    with dist_utils.full_parameters(runner):
        if rank == 0:
            state = {"step": step, "bad_steps": bad_steps, "data_position": position,
                     "config": _jsonable_config(config)}  # fmt: skip
            ckpt.write_main_state(tmp, model, optimizer_state, scheduler, state, has_adapters)
    dist_utils.barrier()
    if rank == 0:
        ckpt.commit_checkpoint(root, tmp, step, config.keep_checkpoints)
    dist_utils.barrier()


def _jsonable_config(config: SFTConfig) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    for key in ("train_data", "eval_data", "general_data"):
        if isinstance(values[key], list):
            values[key] = f"<{len(values[key])} records>"
    return values


def _save_final(model: nn.Module, tokenizer: Any, out_dir: Path, has_adapters: bool,
                state_dict: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """The adapter (or full model); if that save fails the weights go elsewhere (FinalSaveError says where)."""
    if has_adapters:
        import fastpeft

        return ckpt.save_or_rescue(lambda d: Path(fastpeft.save_adapter(model, d)), out_dir / "adapter", "adapter")
    return ckpt.save_or_rescue(lambda d: ckpt.save_pretrained(model, d, tokenizer, state_dict), out_dir / "model",
                               "model")  # fmt: skip
