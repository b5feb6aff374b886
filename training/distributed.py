"""Data-parallel training (DDP) under ``torchrun``, or spawned locally with :func:`launch_local`.

Process groups use NCCL on CUDA and gloo on CPU. Every rank builds the same model and data plan;
:class:`fastpeft.training.data.BatchPlan` gives each rank its share of the global batch, and the
loss is normalised by the global number of target tokens (all-reduced), so N ranks take exactly
the step one process would take on the same global batch.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is not supported yet: the NF4 base weights live in
uint8 buffers that FSDP would have to shard alongside the bf16 adapters, and checkpoints here save
full (unsharded) state from rank 0. DDP replicates the (small, quantized) model on each rank.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


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


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, fn: Callable[..., Any], args: tuple, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
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
