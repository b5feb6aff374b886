"""What the reward-model, DPO, GRPO and PPO recipes share, built on the SFT recipe's machinery.

- :class:`RecipeConfig`: the common dataclass fields (model, adapters, optimisation, output); each
  recipe's config adds its own. YAML + ``--key value`` parsing is :mod:`~fastpeft.training.config_io`.
- :func:`setup_run`: device, DDP process group, seed, tokenizer, model (a local directory or a
  config dict, :mod:`~fastpeft.training.model_setup`), an optional SFT adapter merged into the base
  first (so the adapter-disabled reference *is* the SFT policy), then fresh LoRA/QLoRA adapters.
- :class:`Checkpointer`: atomic checkpoints and exact resume through
  :mod:`~fastpeft.training.checkpoint` (trainable tensors of the whole trained module, e.g. LoRA
  + a value head; PEFT-format adapter beside them; optimizer, scheduler, RNG, trainer state).
- :func:`optimizer_step`: clip, skip non-finite steps with a warning (counted; too many stop the
  run), step optimizer and scheduler — the SFT recipe's rule.
- :func:`lm_token_logprobs`: per-token log-probs of a causal LM from its backbone + LM head.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fastpeft.training import checkpoint as ckpt
from fastpeft.training import distributed as dist_utils
from fastpeft.training.data import Row, collate, tokenize_record, unpacked_rows
from fastpeft.training.metrics import MetricsLogger, plot_loss_curve
from fastpeft.training.model_setup import (apply_finetune_mode, build_model, build_optimizer, build_scheduler,
                                           resolve_device)  # fmt: skip
from fastpeft.training.tokenizer import load_tokenizer

PATH = {"path": True}  # config_io checks that these name an existing file or directory
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


@dataclasses.dataclass
class RecipeConfig:
    """Fields every preference / RL recipe has (YAML keys and ``--key value`` use these names)."""

    model: str | None = dataclasses.field(default=None, metadata=PATH)
    model_config: dict | None = None
    tokenizer: str | None = dataclasses.field(default=None, metadata=PATH)
    init_adapter: str | None = dataclasses.field(default=None, metadata=PATH)  # merged into the base first
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str = "auto"
    finetune: Literal["lora", "qlora", "full"] = "lora"
    lora: dict = dataclasses.field(default_factory=dict)
    train_data: str | list | None = None
    eval_data: str | list | None = None
    max_seq_len: int = 512
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    scheduler: str = "constant"
    warmup_steps: int = 0
    max_steps: int = 100
    max_grad_norm: float | None = 1.0
    max_bad_steps: int = 10
    seed: int = 0
    eval_every: int | None = None
    output_dir: str = "runs/rl"
    save_every: int | None = None
    keep_checkpoints: int | None = 2
    resume: bool = False
    log_every: int = 1
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "max_steps", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive or null, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must have two numbers, got {self.adam_betas}")


@dataclasses.dataclass
class RunContext:
    """Everything :func:`setup_run` resolved for one process of a run."""

    rank: int
    world_size: int
    device: torch.device
    distributed: bool
    tokenizer: Any
    model: nn.Module  # the causal LM (with adapters unless finetune="full")
    has_adapters: bool
    out_dir: Path

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_run(config: RecipeConfig, model: nn.Module | None = None, tokenizer: Any = None) -> RunContext:
    """Device, process group, seed, tokenizer and model with adapters (see the module docstring)."""
    rank, local_rank, world_size = dist_utils.world()
    device = resolve_device(config.device, local_rank)
    distributed = dist_utils.init_distributed(device)
    torch.manual_seed(config.seed)
    if tokenizer is None:
        path = config.tokenizer
        if path is None and config.model and any((Path(config.model) / f).exists()
                                                 for f in ("tokenizer.json", "tokenizer_config.json")):  # fmt: skip
            path = config.model
        tokenizer = load_tokenizer(path)
    if model is None:
        model = build_model(config.model, config.model_config, config.dtype, config.attn_implementation, config.seed)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                         f"{model.get_input_embeddings().num_embeddings}")  # fmt: skip
    if config.init_adapter:
        import fastpeft

        fastpeft.load_adapter(model, config.init_adapter, adapter_name="init")
        fastpeft.merge_and_unload(model)
    has_adapters = apply_finetune_mode(model, config.finetune, config.lora)
    model.to(device)
    model.train()  # from_pretrained returns eval mode; LoRA dropout must be active while training
    return RunContext(rank, world_size, device, distributed, tokenizer, model, has_adapters, Path(config.output_dir))


def require_reference(ctx: RunContext, what: str) -> None:
    """The reference policy is the adapter-disabled model: there must be adapters to disable."""
    if not ctx.has_adapters:
        raise ValueError(f"{what} needs a reference policy, which is the model with its adapters disabled; "
                         "use finetune='lora' or 'qlora' (or turn the reference term off)")  # fmt: skip


def build_optimization(config: RecipeConfig, params: list[nn.Parameter], total_updates: int,
                       device: torch.device) -> tuple[torch.optim.Optimizer, Any]:  # fmt: skip
    optimizer = build_optimizer(config.optimizer, params, config.lr, config.weight_decay, tuple(config.adam_betas),
                                config.adam_eps, device)  # fmt: skip
    return optimizer, build_scheduler(config.scheduler, optimizer, config.warmup_steps, total_updates)


def wrap_ddp(module: nn.Module, ctx: RunContext, find_unused: bool = False) -> nn.Module:
    """DDP around ``module`` when the run is distributed (gradients averaged over ranks)."""
    return dist_utils.ddp(module, ctx.device, find_unused) if ctx.distributed else module


def optimizer_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any, loss: float,
                   max_grad_norm: float | None, bad_steps: int, max_bad_steps: int,
                   step: int) -> tuple[float, bool, int]:  # fmt: skip
    """Clip and step; a non-finite loss or gradient norm skips the update. Returns
    ``(grad_norm, stepped, bad_steps)``; raises after more than ``max_bad_steps`` skipped steps."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf")))
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, True, bad_steps
    bad_steps += 1
    optimizer.zero_grad(set_to_none=True)
    warnings.warn(f"step {step}: non-finite loss ({loss}) or grad norm ({grad_norm}); update skipped "
                  f"({bad_steps}/{max_bad_steps})", stacklevel=2)  # fmt: skip
    if bad_steps > max_bad_steps:
        raise RuntimeError(f"more than max_bad_steps={max_bad_steps} non-finite steps; stopping")
    return grad_norm, False, bad_steps


def jsonable_config(config: Any) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    for key, value in values.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            values[key] = f"<{len(value)} records>"
    return values


class Checkpointer:
    """Checkpoint / resume of ``module`` (everything trainable in the run) via the SFT checkpoint code."""

    def __init__(self, ctx: RunContext, config: RecipeConfig, module: nn.Module):
        self.ctx, self.config, self.module = ctx, config, module
        self.root = ctx.out_dir / "checkpoints"

    def resume(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any] | None:
        """Restore the latest checkpoint when ``config.resume``; its trainer state, or None."""
        path = ckpt.latest_checkpoint(self.root) if self.config.resume else None
        if path is None:
            return None
        return ckpt.load_checkpoint(path, self.module, optimizer, scheduler, self.ctx.rank)

    def save(self, step: int, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any]) -> None:
        rank = self.ctx.rank
        tmp = ckpt.begin_checkpoint(self.root, step) if rank == 0 else None
        tmp = Path(dist_utils.broadcast_object(str(tmp) if tmp else None))
        dist_utils.barrier()
        ckpt.write_rank_state(tmp, rank)
        if rank == 0:
            full = {"step": step, "config": jsonable_config(self.config), **state}
            ckpt.write_main_state(tmp, self.module, optimizer, scheduler, full, save_adapter=False)
            if self.ctx.has_adapters:
                import fastpeft

                fastpeft.save_adapter(self.ctx.model, tmp / "adapter")
        dist_utils.barrier()
        if rank == 0:
            ckpt.commit_checkpoint(self.root, tmp, step, self.config.keep_checkpoints)
        dist_utils.barrier()

    def maybe_save(self, step: int, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any]) -> None:
        if self.config.save_every and step % self.config.save_every == 0:
            self.save(step, optimizer, scheduler, state)


def open_logger(ctx: RunContext, resumed_step: int | None) -> MetricsLogger:
    if ctx.main:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
    return MetricsLogger(ctx.out_dir / "metrics.jsonl", resumed_step, enabled=ctx.main)


def save_final(ctx: RunContext, extra: dict[str, torch.Tensor] | None = None, extra_name: str = "head") -> Path | None:
    """Adapter (PEFT format) or full model, plus ``extra`` tensors (e.g. a scalar head) as
    ``<extra_name>.safetensors`` beside it; rank 0 only."""
    if not ctx.main:
        return None
    if ctx.has_adapters:
        import fastpeft

        target = Path(fastpeft.save_adapter(ctx.model, ctx.out_dir / "adapter"))
    else:
        target = ctx.out_dir / "model"
        ctx.model.save_pretrained(target, safe_serialization=True)
        ctx.tokenizer.save_pretrained(target)
    if extra:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(target / f"{extra_name}.safetensors"))
    return target


def finish_plot(ctx: RunContext, config: RecipeConfig) -> None:
    if ctx.main and config.plot:
        plot_loss_curve(ctx.out_dir / "metrics.jsonl", ctx.out_dir / "loss.png")


def check_plain_lm_head(lm: nn.Module) -> nn.Module:
    """The LM head, refusing models that scale or soft-cap logits (their head is more than a matmul)."""
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (LM head)")
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for attr in _SCALED_LOGITS:
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise ValueError(f"the model's config sets {attr}; per-token log-probs here use the plain LM head")
    return head


def backbone_hidden(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Final hidden states ``[B, T, H]`` of the LM's backbone (``lm.base_model``), no LM head."""
    out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out[0]


def token_logprobs_from_hidden(lm: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                               temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """``log softmax(h · Wᵀ / τ)[target]`` per position: hidden ``[B, T, H]``, targets ``[B, T]`` -> ``[B, T]``
    (fp32; the logits ``[B, T, V]`` of one micro-batch are materialised once)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    logits = check_plain_lm_head(lm)(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def lm_token_logprobs(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None, start: int = 1,
                      temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """``log p(x_t | x_<t)`` for ``t`` in ``[start, T)``: ``[B, T - start]`` (inputs ``[B, T]``)."""
    if not 1 <= start < input_ids.shape[1]:
        raise ValueError(f"start must be in [1, {input_ids.shape[1]}), got {start}")
    hidden = backbone_hidden(lm, input_ids, attention_mask, position_ids)[:, start - 1 : -1]
    return token_logprobs_from_hidden(lm, hidden, input_ids[:, start:], temperature)


def batch_logprob_sums(lm: nn.Module, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """Sum (or mean) of target-token log-probs per row of an SFT-collated batch (labels -100 = not a
    target): ``[B]``. Used for DPO's sequence log-probs."""
    mask = batch["segment_ids"] > 0
    logp = lm_token_logprobs(lm, batch["input_ids"], mask.long(), batch["position_ids"])
    targets = batch["labels"][:, 1:] != -100
    total = (logp * targets).sum(-1)
    return total / targets.sum(-1).clamp(min=1) if average else total


# ------------------------------------------------------------------------------ preference pairs
@dataclasses.dataclass
class PairRow:
    """One tokenized preference pair (SFT rows: prompt tokens are labelled -100)."""

    index: int
    chosen: Row
    rejected: Row
    margin: float = 0.0


def tokenize_pairs(records: list[dict[str, Any]], tokenizer: Any, max_seq_len: int,
                   use_chat_template: bool = False, margin_key: str = "margin") -> list[PairRow]:  # fmt: skip
    """``{"prompt", "chosen", "rejected"[, "margin"]}`` records -> :class:`PairRow` list, through the
    SFT tokenization (completion-only labels, EOS appended). Pairs where truncation leaves either
    side without a target token are dropped with a warning."""
    pairs, dropped = [], 0
    for i, rec in enumerate(records):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            raise ValueError(f"preference record {i} lacks {missing} (keys: {sorted(rec)})")
        sides = [tokenize_record({"prompt": rec["prompt"], "completion": rec[k]}, tokenizer, max_seq_len,
                                 use_chat_template=use_chat_template) for k in ("chosen", "rejected")]  # fmt: skip
        if any(s is None for s in sides):
            dropped += 1
            continue
        chosen, rejected = unpacked_rows(sides)
        pairs.append(PairRow(i, chosen, rejected, float(rec.get(margin_key, 0.0))))
    if dropped:
        warnings.warn(f"dropped {dropped} pairs with no target tokens within max_seq_len={max_seq_len}", stacklevel=2)
    if not pairs:
        raise ValueError("no usable preference pairs")
    return pairs


def collate_pairs(pairs: list[PairRow], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch of ``2B`` rows: the B chosen rows, then the B rejected ones (SFT ``collate``)."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return {k: v.to(device) for k, v in batch.items()}
