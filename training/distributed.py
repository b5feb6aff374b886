"""Data parallelism under ``torchrun`` (or spawned locally with :func:`launch_local`): DDP or FSDP2.

Process groups use NCCL on CUDA and gloo on CPU. Every rank builds the same model and data plan;
:class:`fastpeft.training.data.BatchPlan` gives each rank its share of the global batch, and the
loss is normalised by the global number of target tokens (all-reduced), so N ranks take exactly
the step one process would take on the same global batch. Both wrappers average gradients over
ranks (DDP all-reduce, FSDP2 reduce-scatter), hence the same loss scale.

``parallel="ddp"`` replicates the model on each rank. ``parallel="fsdp"`` applies FSDP2
(``torch.distributed.fsdp.fully_shard``, torch >= 2.6 API) to every transformer block (the classes
in the model's ``_no_split_modules``) and then to the loss wrapper as the root (embeddings, final
norm, LM head): parameters, gradients and optimizer state are sharded over ranks (dim 0).
Every recipe goes through these wrappers (:func:`fastpeft.training.loop.start_run`). What is
supported, each checked on CPU/gloo with 2 ranks against one process with the same global batch
(``tests/training/test_distributed.py`` for SFT; ``tests/training/test_recipes.py`` for DPO and
GRPO, FSDP2 included, whose rollouts sample from gathered parameters: losses, gradient norms,
eval losses to rel 1e-5):

- ``finetune="full"`` and ``"lora"`` (dense base + LoRALinear adapters; frozen and trainable
  parameters share a block's FSDP group), gradient accumulation (``set_requires_gradient_sync``),
  gradient clipping (``clip_grad_norm_`` on DTensor gradients: the norm of the full gradient);
- ``finetune="qlora"``: works, but the NF4 base is *not* sharded: FSDP2 shards parameters only, and
  the NF4 codes and statistics are uint8/fp32 *buffers*, which every rank keeps whole (as under
  DDP); the adapters, biases, norms, embeddings and LM head are sharded;
- checkpoints and final exports are the same files as under DDP, with full tensors
  (``optimizer.pt`` keyed like ``optimizer.state_dict()``; optimizer shards gathered tensor by
  tensor with ``DTensor.full_tensor``, the full model via ``get_model_state_dict``), and resume
  re-shards them with ``distribute_tensor``: a single-process checkpoint resumes under FSDP;
- evaluation (loss and greedy exact match) runs on every rank over the gathered model, rank 0
  logs it (transformers' ``generate`` keeps the ranks of an FSDP-managed model in step).

Not supported / caveats: the bitsandbytes optimizers (their state is not DTensor-aware; refused
with a ValueError); saving, the final export and evaluation all-gather the *whole* model on every
rank for their duration (:func:`full_parameters`), so peak memory there is the DDP model's;
evaluation under FSDP needs torch >= 2.7 (``set_reshard_after_forward``; checked at start); no
mixed-precision policy or CPU offload (``bf16=True`` autocast still applies); gradient
checkpointing, packing and adapter variants other than plain LoRA (DoRA, AdaLoRA, ...) are untested
under FSDP; NCCL/GPU untested here. With one process ``parallel`` has no effect.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("ddp", "fsdp")
FSDP_OPTIMIZERS = ("adamw", "sgd")  # torch optimizers; bitsandbytes' need plain CUDA tensors


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> bool:
    """Initialise the default process group when ``WORLD_SIZE > 1``; True if distributed."""
    _, _, world_size = world()
    if world_size <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity without a process group)."""
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_fsdp(module: nn.Module) -> bool:
    """Does ``module`` hold FSDP2-sharded submodules?"""
    return bool(_fsdp_modules(module))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: instances of the classes its Hugging Face models list
    in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), innermost first."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in names]


def ddp(module: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel on ``device`` (gradients averaged over ranks)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused)


def wrap_for_training(
    loss_module: nn.Module, parallel: str, device: torch.device, evaluates: bool = False
) -> nn.Module:
    """``loss_module`` made data-parallel: a DDP wrapper, or (``"fsdp"``) ``loss_module`` itself
    with FSDP2 applied in place to each transformer block, then to it as the root. ``evaluates``:
    the run will evaluate, which FSDP supports from torch 2.7 (checked here, not hours later)."""
    if parallel == "ddp":
        return ddp(loss_module, device)
    if parallel != "fsdp":
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if evaluates and not hasattr(FSDPModule, "set_reshard_after_forward"):
        raise ValueError(
            f"evaluating under parallel='fsdp' needs torch >= 2.7 (FSDPModule.set_reshard_after_forward); "
            f"this is torch {torch.__version__}: drop eval_data or use parallel='ddp'"
        )
    blocks = transformer_blocks(loss_module)
    if not blocks:
        raise ValueError(
            f"parallel='fsdp' shards per transformer block, but {type(loss_module).__name__} has no "
            "module listed in a `_no_split_modules` (not a Hugging Face transformer?)"
        )
    from torch.distributed.device_mesh import init_device_mesh

    # explicit mesh: fully_shard's default follows the machine's accelerator, not the run's device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:  # innermost first: a parent's group takes only what its children left
        fully_shard(block, mesh=mesh)
    fully_shard(loss_module, mesh=mesh)
    # FSDP2 picks its root at the first forward; a first forward through a submodule (the RL
    # recipes sample from the LM inside the wrapper before any training forward) would make a block
    # the root. Sharding is complete here, so fix the root now (torch has no public call for it).
    state = getattr(loss_module, "_get_fsdp_state", None)
    if state is not None and hasattr(state(), "_lazy_init"):
        state()._lazy_init()
    return loss_module


@contextlib.contextmanager
def gradient_sync(runner: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, a backward through ``runner`` reduces gradients over ranks only if ``enabled``
    (DDP ``no_sync``; FSDP2 ``set_requires_gradient_sync``); other micro-batches accumulate locally."""
    if enabled or not is_distributed():
        yield
    elif isinstance(runner, nn.parallel.DistributedDataParallel):
        with runner.no_sync():
            yield
    elif _fsdp_modules(runner):
        runner.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            runner.set_requires_gradient_sync(True)  # type: ignore[operator]
    else:
        yield


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` returning the total norm as a float; with FSDP2's DTensor gradients the
    norm is reduced over all shards (a replicated DTensor), i.e. the norm of the full gradient."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if _is_dtensor(norm):
        norm = norm.full_tensor()  # type: ignore[union-attr]
    return float(norm)


@contextlib.contextmanager
def full_parameters(module: nn.Module, for_forward: bool = False) -> Iterator[None]:
    """FSDP2: all-gather every parameter of ``module`` on every rank (a collective: all ranks enter),
    so code inside (rank 0 saving, every rank evaluating) sees plain full tensors; resharded on exit.
    ``for_forward``: also keep them gathered through forward calls made inside. No-op without FSDP."""
    fsdp = _fsdp_modules(module)
    if not fsdp:
        yield
        return
    if for_forward and not hasattr(fsdp[0], "set_reshard_after_forward"):
        raise RuntimeError("evaluating under parallel='fsdp' needs torch >= 2.7 (FSDPModule.set_reshard_after_forward)")
    for m in fsdp:
        m.unshard()  # type: ignore[operator]
    if for_forward:
        for m in fsdp:
            m.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
    try:
        yield
    finally:
        if for_forward:  # back to fully_shard's defaults: blocks reshard, the root keeps its params
            for m in fsdp:
                m.set_reshard_after_forward(m is not module, recurse=False)  # type: ignore[operator]
        for m in fsdp:
            m.reshard()  # type: ignore[operator]


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()`` with FSDP2-sharded state gathered into full CPU tensors, tensor by
    tensor (a collective: all ranks call it); ranks with ``keep=False`` get ``{}``."""
    state = optimizer.state_dict()
    if not any(_is_dtensor(v) for s in state["state"].values() for v in s.values()):
        return state if keep else {}
    full: dict[int, dict[str, Any]] = {}
    for idx in sorted(state["state"]):  # the same order on every rank: the gathers pair up
        entry = {k: v.full_tensor().cpu() if _is_dtensor(v) else v for k, v in state["state"][idx].items()}
        if keep:
            full[idx] = entry
    return {"state": full, "param_groups": state["param_groups"]} if keep else {}


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """FSDP2: ``model.state_dict()`` with full CPU tensors on rank 0 (``{}`` elsewhere; a collective),
    for ``save_pretrained(state_dict=...)``: under FSDP2 ``state_dict()`` returns the shards even
    inside :func:`full_parameters`. None without FSDP (the model's own state_dict is full)."""
    if not _fsdp_modules(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full ``tensor`` laid out like ``like``: distributed the same way when ``like`` is a DTensor
    (a collective: all ranks call it with the same tensor), else unchanged."""
    if not _is_dtensor(like):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    mesh, placements = like.device_mesh, like.placements  # type: ignore[attr-defined]
    return distribute_tensor(tensor.to(like.device, like.dtype), mesh, placements)


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The inverse of :func:`full_optimizer_state`: per-parameter state tensors shaped like their
    (DTensor) parameter are distributed like it, ready for ``optimizer.load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(_is_dtensor(p) for p in params):
        return state
    for idx in sorted(state["state"]):
        param = params[int(idx)]
        for key, value in state["state"][idx].items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape:
                state["state"][idx][key] = shard_like(value, param)
    return state


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, fn: Callable[..., Any], args: tuple, world_size: int, port: int) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # N ranks on a small CPU box should not oversubscribe its cores
    try:
        fn(*args)
    finally:
        cleanup()


def launch_local(fn: Callable[..., Any], args: tuple = (), nprocs: int = 2) -> None:
    """Run ``fn(*args)`` in ``nprocs`` spawned processes on this machine, as torchrun would
    (``fn`` must be importable: a module-level function). Raises if any process fails."""
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(fn, args, nprocs, _free_port()), nprocs=nprocs, join=True)
