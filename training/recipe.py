"""The one recipe core: the config and the run set-up every recipe (SFT, reward model, DPO, GRPO,
PPO) is built from. The training loop's shared pieces are in :mod:`fastpeft.training.loop`.

- :class:`RecipeConfig`: every shared field, declared once; a recipe's config adds its own fields
  (and its own ``lr`` / ``output_dir`` defaults). YAML + ``--key value`` parsing is
  :mod:`~fastpeft.training.config_io`.
- :func:`setup_run`: device, process group (torchrun / :func:`~fastpeft.training.distributed.launch_local`),
  seed, tokenizer, model (a local directory or a config dict, :mod:`~fastpeft.training.model_setup`),
  an optional adapter merged into the base first (so the adapter-disabled reference *is* that
  policy), fresh LoRA/QLoRA adapters, then the memory options (:func:`apply_memory_options`).
- :func:`require_reference`: the reference policy is the model with its adapters disabled
  (``fastpeft.disable_adapters``), never a second copy.
- :func:`save_final`: the adapter (PEFT format) or the full model, plus extra head tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fastpeft.training import checkpoint as ckpt
from fastpeft.training import distributed as dist_utils
from fastpeft.training.config_checks import check_training_fields
from fastpeft.training.model_setup import apply_finetune_mode, build_model, resolve_device
from fastpeft.training.step_design import StepDesign, apply_step_design
from fastpeft.training.tokenizer import load_tokenizer

PATH = {"path": True}  # config_io checks that these name an existing file or directory


@dataclasses.dataclass
class RecipeConfig:
    """Fields every recipe has (YAML keys and ``--key value`` use these names)."""

    # model and tokenizer (no downloads: a local directory, or a config dict to build from)
    model: str | None = dataclasses.field(default=None, metadata=PATH)
    model_config: dict | None = None
    tokenizer: str | None = dataclasses.field(default=None, metadata=PATH)  # default: model dir or bundled
    init_adapter: str | None = dataclasses.field(default=None, metadata=PATH)  # merged into the base first
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str = "auto"
    # what trains
    finetune: Literal["lora", "qlora", "full"] = "lora"
    lora: dict = dataclasses.field(default_factory=dict)  # fastpeft.LoraConfig fields
    # data: a JSONL/JSON path, a datasets directory, or a list of records
    train_data: str | list | None = None
    eval_data: str | list | None = None
    max_seq_len: int = 512
    use_chat_template: bool = False
    # optimization; one step = micro_batch_size x grad_accum_steps x world_size rows (pairs for the
    # preference recipes; the RL recipes batch prompts_per_step prompts and micro-batch their completions)
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    scheduler: str = "linear"
    warmup_steps: int = 0
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int | None = None  # when set, wins over num_epochs
    num_epochs: float | None = 1.0
    max_grad_norm: float | None = 1.0  # null: no clipping
    max_bad_steps: int = 10
    seed: int = 0
    # compute and memory
    bf16: bool = False  # bf16 autocast of every forward (fp32 master weights keep fp32 gradients)
    gradient_checkpointing: bool = False
    # more memory (fastpeft.training.step_design): block inputs in host memory; MLP over row tiles; lean norms
    offload_activations: bool = False
    mlp_tile_rows: int | None = None
    lean_norms: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several ranks; see fastpeft.training.distributed
    # evaluation
    eval_every: int | None = None
    eval_at_start: bool = True
    eval_batch_size: int = 32
    eval_max_examples: int | None = 200
    eval_match: Literal["answer", "exact"] = "exact"  # greedy continuations vs a record's "answer"
    # output
    output_dir: str = "runs/train"
    save_every: int | None = None
    keep_checkpoints: int | None = 2  # the newest N; null or 0: all
    resume: bool = False
    log_every: int = 1
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        check_training_fields(self)
        if self.max_steps is None and self.num_epochs is None:
            raise ValueError("num_epochs: set max_steps or num_epochs (both are null)")
        self.step_design()  # checks mlp_tile_rows
        if self.parallel not in dist_utils.PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {dist_utils.PARALLEL_MODES}, got {self.parallel!r}")
        if self.parallel == "fsdp" and self.optimizer not in dist_utils.FSDP_OPTIMIZERS:
            raise ValueError(
                f"parallel='fsdp' shards parameters into DTensors, which optimizer={self.optimizer!r} "
                f"cannot update; use one of {dist_utils.FSDP_OPTIMIZERS}"
            )

    def step_design(self) -> StepDesign:
        """The activation-memory options as a :class:`~fastpeft.training.step_design.StepDesign`."""
        return StepDesign(self.gradient_checkpointing, self.offload_activations, self.mlp_tile_rows, self.lean_norms)

    def total_steps(self, steps_per_epoch: int) -> int:
        """``max_steps`` when set, else ``num_epochs`` passes over the data."""
        if self.max_steps:
            return self.max_steps
        return max(1, math.ceil(self.num_epochs * steps_per_epoch))


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
    bf16: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast on the run's device when the config asks for it (every forward uses this)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            yield


def setup_run(
    config: RecipeConfig, model: nn.Module | None = None, tokenizer: Any = None, lora: dict[str, Any] | None = None
) -> RunContext:
    """Device, process group, seed, tokenizer and model with adapters (see the module docstring).
    ``lora`` replaces ``config.lora`` (SFT's domain-adaptive default)."""
    rank, local_rank, world_size = dist_utils.world()
    if rank == 0:  # before anything is loaded: an unusable output_dir would lose the trained weights
        ckpt.check_output_dir(Path(config.output_dir), "adapter", "model", "checkpoints")
    device = resolve_device(config.device, local_rank)
    distributed = dist_utils.init_distributed(device)
    torch.manual_seed(config.seed)
    if tokenizer is None:
        path = config.tokenizer
        if (
            path is None
            and config.model
            and any((Path(config.model) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        ):
            path = config.model
        tokenizer = load_tokenizer(path)
    if model is None:
        model = build_model(config.model, config.model_config, config.dtype, config.attn_implementation, config.seed)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
            f"{model.get_input_embeddings().num_embeddings}"
        )
    if config.init_adapter:
        import fastpeft

        fastpeft.load_adapter(model, config.init_adapter, adapter_name="init")
        fastpeft.merge_and_unload(model)
    has_adapters = apply_finetune_mode(model, config.finetune, config.lora if lora is None else lora)
    model.to(device)
    apply_memory_options(model, config)
    model.train()  # from_pretrained returns eval mode; LoRA dropout must be active while training
    return RunContext(
        rank, world_size, device, distributed, tokenizer, model, has_adapters, Path(config.output_dir), config.bf16
    )


def apply_memory_options(model: nn.Module, config: RecipeConfig) -> None:
    """The activation-memory options of ``config`` applied to ``model`` (after the adapters), the same
    for every recipe: gradient checkpointing, offloaded checkpointing, tiled MLPs, lean norms."""
    apply_step_design(model, config.step_design())


def require_reference(ctx: RunContext, what: str) -> None:
    """The reference policy is the adapter-disabled model: there must be adapters to disable."""
    if not ctx.has_adapters:
        raise ValueError(
            f"{what} needs a reference policy, which is the model with its adapters disabled; "
            "use finetune='lora' or 'qlora' (or turn the reference term off)"
        )


def jsonable_config(config: Any) -> dict[str, Any]:
    """The config as a JSON-safe dict (in-memory record lists become ``"<N records>"``)."""
    values = dataclasses.asdict(config)
    for key, value in values.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            values[key] = f"<{len(value)} records>"
    return values


def save_final(
    ctx: RunContext,
    extra: dict[str, torch.Tensor] | None = None,
    extra_name: str = "head",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """Adapter (PEFT format) or full model (``state_dict``: its gathered FSDP state), plus ``extra``
    tensors (e.g. a scalar head) as ``<extra_name>.safetensors`` beside it; rank 0 only. If that
    save fails the weights go elsewhere and :class:`~fastpeft.training.checkpoint.FinalSaveError` says where."""
    if not ctx.main:
        return None

    def save(target: Path) -> Path:
        if ctx.has_adapters:
            import fastpeft

            target = Path(fastpeft.save_adapter(ctx.model, target))
        else:
            ckpt.save_pretrained(ctx.model, target, ctx.tokenizer, state_dict)
        if extra:
            from safetensors.torch import save_file

            tensors = {k: v.detach().cpu().contiguous() for k, v in extra.items()}
            save_file(tensors, str(target / f"{extra_name}.safetensors"))
        return target

    what = "adapter" if ctx.has_adapters else "model"
    return ckpt.save_or_rescue(save, ctx.out_dir / what, what if extra is None else "final weights")
