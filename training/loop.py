"""The training loop's shared pieces: one optimizer update rule, one checkpointer, one cadence.

A recipe keeps its own loop (what a step computes is the recipe) and calls :func:`start_run` for a
:class:`RecipeRun`, which holds what every loop needs and nothing recipe-specific:

- the trained module made data-parallel (``runner``: DDP, or FSDP2 applied in place) with the
  optimizer and scheduler over its trainable parameters;
- :meth:`RecipeRun.micro_batch`: the context of one micro-batch (gradient sync only on the last
  micro-batch of an update, bf16 autocast), and :meth:`RecipeRun.backward`, which scales a
  micro-batch's share of the global loss by ``world_size`` (DDP and FSDP average gradients);
- :meth:`RecipeRun.update`: clip, then step optimizer and scheduler, or skip the update when the
  loss or gradient norm is not finite (warning, counted; more than ``max_bad_steps`` stop the run);
- :meth:`RecipeRun.end_step`: the one cadence: evaluate every ``eval_every`` steps, log every
  ``log_every`` (and any step that evaluated or skipped an update), update the progress bar,
  checkpoint every ``save_every``, call the callbacks;
- :meth:`RecipeRun.finish`: final evaluation, final save, the end record and the loss curve PNG.

Checkpoints (:class:`Checkpointer`, on :mod:`fastpeft.training.checkpoint`) are atomic, keep the
newest ``keep_checkpoints``, hold the data layout (a resume with another global batch is refused)
and any recipe state (``run.state``), and resume exactly: same data order, RNG, optimizer and
scheduler state. Under FSDP every rank gathers, rank 0 writes the same files as under DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpeft.training import checkpoint as ckpt
from fastpeft.training import distributed as dist_utils
from fastpeft.training.metrics import MetricsLogger, Throughput, peak_memory_bytes, plot_loss_curve, progress_bar
from fastpeft.training.model_setup import build_optimizer, build_scheduler
from fastpeft.training.recipe import RecipeConfig, RunContext, jsonable_config, save_final

Callback = Callable[[int, dict[str, Any]], None]


@dataclasses.dataclass
class RunResult:
    """What a recipe's ``train`` returns."""

    steps: int
    final_loss: float | None
    eval: dict[str, Any]
    history: list[dict[str, Any]]  # every step's record (logged or not)
    output_dir: Path
    saved: Path | None  # adapter directory (adapters) or model directory (full fine-tuning)
    train_seconds: float
    tokens_per_s: float
    peak_memory_bytes: int


class Checkpointer:
    """Checkpoint / resume of ``module`` (everything trainable in the run, e.g. LoRA + a value head);
    the adapter is also saved in PEFT format beside the tensors."""

    def __init__(self, ctx: RunContext, config: RecipeConfig, module: nn.Module, runner: nn.Module):
        self.ctx, self.config, self.module, self.runner = ctx, config, module, runner
        self.root = ctx.out_dir / "checkpoints"

    def resume(self, optimizer: torch.optim.Optimizer, scheduler: Any, layout: dict[str, Any]) -> dict[str, Any] | None:
        """Restore the newest intact checkpoint (manifest-checked, falling back past damaged ones) when
        ``config.resume``; its trainer state, or None."""
        path = ckpt.resume_checkpoint(self.root) if self.config.resume else None
        if path is None:
            return None
        state = ckpt.read_trainer_state(path)
        saved = state.get("data_layout", state.get("data_position", {}))  # (SFT's key before the one core)
        if {k: saved.get(k) for k in layout} != layout:
            raise ValueError(
                f"checkpoint {path} was written for data layout {saved}, this run has {layout}; "
                "resuming would not replay the same batches"
            )
        ckpt.warn_config_changes(path, state.get("config", {}), jsonable_config(self.config))
        return ckpt.load_checkpoint(path, self.module, optimizer, scheduler, self.ctx.rank)

    def save(self, step: int, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any]) -> None:
        rank = self.ctx.rank
        tmp = ckpt.begin_checkpoint(self.root, step) if rank == 0 else None
        tmp = Path(dist_utils.broadcast_object(str(tmp) if tmp else None))
        dist_utils.barrier()  # the directory exists before other ranks write into it
        ckpt.write_rank_state(tmp, rank)
        # FSDP: all ranks take part in gathering the sharded state; rank 0 writes the same files as DDP
        optimizer_state = dist_utils.full_optimizer_state(optimizer, keep=rank == 0)
        with dist_utils.full_parameters(self.runner):
            if rank == 0:
                full = {"step": step, **state, "config": jsonable_config(self.config)}
                ckpt.write_main_state(tmp, self.module, optimizer_state, scheduler, full, save_adapter=False)
                if self.ctx.has_adapters:
                    import fastpeft

                    fastpeft.save_adapter(self.ctx.model, tmp / "adapter")
        dist_utils.barrier()
        if rank == 0:
            ckpt.commit_checkpoint(self.root, tmp, step, self.config.keep_checkpoints)
        dist_utils.barrier()


def optimizer_step(
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss: float,
    max_grad_norm: float | None,
) -> tuple[float, bool]:
    """Clip to ``max_grad_norm`` (None: no clipping) and step; a non-finite loss or gradient norm
    skips the update. Returns ``(grad_norm, stepped)``; gradients are zeroed either way."""
    grad_norm = dist_utils.clip_grad_norm(params, max_grad_norm if max_grad_norm is not None else float("inf"))
    stepped = math.isfinite(loss) and math.isfinite(grad_norm)
    if stepped:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


class RecipeRun:
    """The shared state of one run's loop (module docstring); made by :func:`start_run`."""

    def __init__(
        self,
        ctx: RunContext,
        config: RecipeConfig,
        recipe: str,
        runner: nn.Module,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        checkpointer: Checkpointer,
        total_steps: int,
        layout: dict[str, Any],
        callbacks: Sequence[Callback],
    ):
        self.ctx, self.config, self.recipe, self.runner, self.params = ctx, config, recipe, runner, params
        self.optimizer, self.scheduler, self.checkpointer = optimizer, scheduler, checkpointer
        self.total_steps, self.layout, self.callbacks = total_steps, layout, list(callbacks)
        self.start_step, self.current_step, self.bad_steps, self.state = 0, 0, 0, {}
        self.resumed = False
        self.history: list[dict[str, Any]] = []
        self.last_loss: float | None = None
        self._grad_norm, self._skipped = float("nan"), 0
        self._meter, self._run_meter, self._t0 = Throughput(), Throughput(), time.perf_counter()
        # DDP: rank 0 evaluates alone. FSDP: every rank evaluates the gathered model, because
        # transformers' generate sees an FSDP-managed model and keeps the ranks' decoding in step
        self.evaluates = ctx.main or dist_utils.is_fsdp(runner)
        self.logger: MetricsLogger | None = None
        self.bar: Any = None

    # -------------------------------------------------------------------------------- the loop
    def steps(self) -> Iterator[int]:
        """The 0-based steps still to run."""
        for step in range(self.start_step, self.total_steps):
            self.current_step = step
            yield step

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """One micro-batch's forward and backward: gradients are reduced over ranks only when
        ``last`` (the last micro-batch before an update); bf16 autocast when configured."""
        with dist_utils.gradient_sync(self.runner, last or not self.ctx.distributed), self.ctx.autocast():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this micro-batch's share of the global loss (normalised by global counts):
        DDP and FSDP average gradients over ranks, hence the ``world_size`` factor."""
        (loss * self.ctx.world_size).backward()

    def count_tokens(self, n: int) -> None:
        self._meter.add(n)
        self._run_meter.add(n)

    def update(self, loss: float) -> bool:
        """One optimizer update after the micro-batches' backward; False when it was skipped."""
        self._grad_norm, stepped = optimizer_step(
            self.params, self.optimizer, self.scheduler, loss, self.config.max_grad_norm
        )
        if stepped:
            self.last_loss = loss
            return True
        self.bad_steps += 1
        self._skipped += 1
        step = self.current_step + 1
        warnings.warn(
            f"step {step}: non-finite loss ({loss}) or grad norm ({self._grad_norm}); update skipped "
            f"({self.bad_steps}/{self.config.max_bad_steps})",
            stacklevel=2,
        )
        if self.bad_steps > self.config.max_bad_steps:
            if self.logger is not None:
                self.logger.log({"step": step, "loss": loss, "skipped": "non-finite", "bad_steps": self.bad_steps})
            raise RuntimeError(f"more than max_bad_steps={self.config.max_bad_steps} non-finite steps; stopping")
        return False

    def evaluate_at_start(self, fn: Callable[[], dict[str, Any]] | None) -> None:
        """The step-0 evaluation (``eval_at_start``; not when resuming), logged and kept in the history."""
        if fn is None or not self.config.eval_at_start or self.resumed:
            return
        record = {"step": 0, **self.evaluate(fn)}
        self.logger.log(record)
        self.history.append(record)

    def evaluate(self, fn: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
        """``fn()`` on the ranks that evaluate (see ``evaluates``), with FSDP parameters gathered."""
        if fn is None:
            return {}
        with dist_utils.full_parameters(self.runner, for_forward=True):
            out = fn() if self.evaluates else {}
        dist_utils.barrier()
        return out

    def end_step(self, step: int, record: dict[str, Any], evaluate: Callable[[], dict[str, Any]] | None = None) -> None:
        """After step ``step`` (0-based): the cadence of the module docstring. ``record`` holds the
        recipe's metrics ("loss", ...); the learning rate, gradient norm and skips are added here."""
        done = step + 1
        record = {"step": done, **record, "lr": self.scheduler.get_last_lr()[0], "grad_norm": self._grad_norm}
        if self._skipped:
            record.update(skipped="non-finite", bad_steps=self.bad_steps)
        config = self.config
        if config.eval_every and done % config.eval_every == 0 and done < self.total_steps:
            record.update(self.evaluate(evaluate))
        logged = self._skipped or done % config.log_every == 0 or done == self.total_steps
        if logged or any(k.startswith(("eval_", "exact_match")) for k in record):
            if self._meter.tokens:
                record.update(tokens_per_s=self._meter.rate(), peak_memory_bytes=peak_memory_bytes(self.ctx.device))
            self.logger.log(record)
        self._skipped = 0
        self.history.append(record)
        self.bar.update(1)
        shown = {k: f"{record[k]:.4f}" for k in ("loss", "reward_mean") if isinstance(record.get(k), float)}
        self.bar.set_postfix(**shown)
        if config.save_every and done % config.save_every == 0:
            state = {"bad_steps": self.bad_steps, "data_layout": self.layout, "recipe_state": self.state}
            self.checkpointer.save(done, self.optimizer, self.scheduler, state)
        for cb in self.callbacks:
            cb(done, record)

    def log(self, record: dict[str, Any]) -> None:
        self.logger.log(record)

    # -------------------------------------------------------------------------------- the end
    def finish(
        self,
        evaluate: Callable[[], dict[str, Any]] | None = None,
        extra: Callable[[], dict[str, torch.Tensor]] | None = None,
        extra_name: str = "head",
    ) -> RunResult:
        """Final evaluation and save (``extra()``: head tensors saved beside the adapter), the end
        record, the loss curve; returns the run's :class:`RunResult`."""
        self.bar.close()
        seconds = time.perf_counter() - self._t0
        tokens_per_s = self._run_meter.rate() if self._run_meter.tokens else 0.0
        ctx = self.ctx
        # FSDP: every rank gathers the whole model; rank 0 saves full tensors, the same files as under DDP
        full_state = None if ctx.has_adapters else dist_utils.full_model_state(ctx.model)
        final, saved = {}, None
        with dist_utils.full_parameters(self.runner, for_forward=evaluate is not None):
            if evaluate is not None and self.evaluates:
                final = evaluate()
            if ctx.main:
                saved = save_final(ctx, extra() if extra else None, extra_name, full_state)
        self.logger.log(
            {
                "step": self.total_steps,
                "event": "end",
                **final,
                "train_seconds": seconds,
                "tokens_per_s": tokens_per_s,
                "peak_memory_bytes": peak_memory_bytes(ctx.device),
            }
        )
        if ctx.main and self.config.plot:
            plot_loss_curve(ctx.out_dir / "metrics.jsonl", ctx.out_dir / "loss.png")
        dist_utils.barrier()
        return RunResult(
            self.total_steps,
            self.last_loss,
            final,
            self.history,
            ctx.out_dir,
            saved,
            seconds,
            tokens_per_s,
            peak_memory_bytes(ctx.device),
        )


def start_run(
    ctx: RunContext,
    config: RecipeConfig,
    recipe: str,
    module: nn.Module,
    total_steps: int,
    layout: dict[str, Any],
    saved_module: nn.Module | None = None,
    updates_per_step: int = 1,
    find_unused: bool = False,
    callbacks: Sequence[Callback] = (),
    start_record: dict[str, Any] | None = None,
) -> RecipeRun:
    """Make ``module`` (one forward per micro-batch) data-parallel, build optimizer and scheduler
    (``total_steps * updates_per_step`` updates), resume when asked and open the metrics log.

    ``saved_module``: what checkpoints hold (default ``ctx.model``: the LM with its adapters; pass
    ``module`` when it owns more trainable parameters, e.g. a value head). ``layout``: the data
    layout a resumed run must share (rows, global batch). ``start_record``: extra fields of the
    "start" record. Under FSDP, ``module`` is sharded in place before the optimizer sees it.
    """
    runner = module
    if ctx.distributed:
        if config.parallel == "ddp":
            runner = dist_utils.ddp(module, ctx.device, find_unused)
        else:
            runner = dist_utils.wrap_for_training(module, config.parallel, ctx.device, config.eval_data is not None)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        config.optimizer, params, config.lr, config.weight_decay, tuple(config.adam_betas), config.adam_eps, ctx.device
    )
    scheduler = build_scheduler(config.scheduler, optimizer, config.warmup_steps, total_steps * updates_per_step)
    checkpointer = Checkpointer(ctx, config, saved_module if saved_module is not None else ctx.model, runner)
    run = RecipeRun(
        ctx, config, recipe, runner, params, optimizer, scheduler, checkpointer, total_steps, layout, callbacks
    )
    saved = checkpointer.resume(optimizer, scheduler, layout)
    if saved is not None:
        run.start_step, run.bad_steps, run.resumed = saved["step"], saved.get("bad_steps", 0), True
        run.state = dict(saved.get("recipe_state", {}))
    if ctx.main:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
    run.logger = MetricsLogger(ctx.out_dir / "metrics.jsonl", run.start_step if run.resumed else None, enabled=ctx.main)
    run.logger.log(
        {
            "event": "start",
            "recipe": recipe,
            "step": run.start_step,
            "total_steps": total_steps,
            **(start_record or {}),
            "world_size": ctx.world_size,
            "finetune": config.finetune,
            "trainable_params": sum(p.numel() for p in params),
            "device": str(ctx.device),
        }
    )
    run.bar = progress_bar(total_steps, run.start_step, enabled=ctx.main and config.progress, desc=recipe)
    return run
