"""Atomic training checkpoints and exact resume.

Layout of ``<output_dir>/checkpoints/step-000120/``:

- ``trainable.safetensors``: every trainable parameter by name (adapters, or the whole model in
  full fine-tuning) — what resume restores;
- ``adapter/``: the same adapters in PEFT's format (``fastpeft.save_adapter``), when adapters exist;
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()`` — plain dicts of tensors and numbers;
- ``rng-rank{r}.pt``: torch CPU/CUDA, Python and NumPy RNG states of rank ``r``;
- ``trainer_state.json``: step, data position, skipped-step count, the config.

A checkpoint is written into a temporary directory and renamed into place (atomic on one
filesystem), then ``latest`` is replaced the same way, so a kill at any moment leaves either the
previous or the new checkpoint, never a torn one. ``.pt`` files are read back with
``torch.load(weights_only=True)``: no arbitrary objects are unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastpeft.training import distributed as dist_utils

STEP_PREFIX = "step-"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (shared/tied parameters once), detached and contiguous on CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """The RNG states of this process as tensors, numbers and lists (loadable with weights_only)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def begin_checkpoint(ckpt_root: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (rank 0 creates it)."""
    tmp = ckpt_root / f".{STEP_PREFIX}{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_state(tmp: Path, rank: int) -> None:
    """Each rank writes its own RNG state into the temporary directory."""
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")


def write_main_state(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer | dict[str, Any], scheduler: Any,
                     trainer_state: dict[str, Any], save_adapter: bool) -> None:  # fmt: skip
    """Rank 0 writes the model, optimizer (or an already gathered optimizer state dict, see
    :func:`fastpeft.training.distributed.full_optimizer_state`), scheduler and trainer state."""
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    if save_adapter:
        import fastpeft

        fastpeft.save_adapter(model, str(tmp / "adapter"))
    torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, default=str))


def commit_checkpoint(ckpt_root: Path, tmp: Path, step: int, keep: int | None) -> Path:
    """Rename ``tmp`` into ``step-NNNNNN``, point ``latest`` at it, prune old checkpoints."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    final = ckpt_root / f"{STEP_PREFIX}{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    _write_text_atomic(ckpt_root / "latest", final.name)
    if keep:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint named by ``latest``, or the newest complete one."""
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        named = ckpt_root / pointer.read_text().strip()
        if named.is_dir():
            return named
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``path``."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing trainer_state.json")
    return json.loads(state_file.read_text())


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    rank: int = 0) -> dict[str, Any]:  # fmt: skip
    """Restore everything saved in ``path``; returns the trainer state dict. With FSDP2 (DTensor
    parameters) every rank calls this: the full tensors are re-sharded collectively."""
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing {name}")
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(params[name].shape)}")  # fmt: skip
            params[name].copy_(dist_utils.shard_like(tensor, params[name]))
    device = next(model.parameters()).device
    optimizer_state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(dist_utils.shard_optimizer_state(optimizer_state, optimizer))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return read_trainer_state(path)
