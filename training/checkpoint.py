"""Atomic training checkpoints and exact resume.

Layout of ``<output_dir>/checkpoints/step-000120/``:

- ``trainable.safetensors``: every trainable parameter by name (adapters, or the whole model in
  full fine-tuning) — what resume restores;
- ``adapter/``: the same adapters in PEFT's format (``fastpeft.save_adapter``), when adapters exist;
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()`` — plain dicts of tensors and numbers;
- ``rng-rank{r}.pt``: torch CPU/CUDA, Python and NumPy RNG states of rank ``r``;
- ``trainer_state.json``: step, data position, skipped-step count, the config;
- ``manifest.json``: the size and SHA-256 of every other file.

A checkpoint is written into a temporary directory and renamed into place (atomic on one
filesystem), then ``latest`` is replaced the same way, so a kill at any moment leaves either the
previous or the new checkpoint, never a torn one. Resume (:func:`resume_checkpoint`) checks the
manifest, so a truncated or bit-flipped file (a full disk, a bad copy) is caught before anything is
loaded, and falls back to the newest intact checkpoint with a one-line warning. ``.pt`` files are
read back with ``torch.load(weights_only=True)``: no arbitrary objects are unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastpeft.training import distributed as dist_utils

STEP_PREFIX = "step-"
MANIFEST = "manifest.json"
REQUIRED = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
# config fields whose change makes a resumed run differ from the uninterrupted one
EXACT_RESUME_FIELDS = (
    "seed",
    "lr",
    "scheduler",
    "warmup_steps",
    "optimizer",
    "weight_decay",
    "adam_betas",
    "adam_eps",
    "max_grad_norm",
)


class FinalSaveError(OSError):
    """The final save failed; the message says where the weights were written instead."""


def check_output_dir(path: Path, *children: str) -> None:
    """Fail before any model is loaded when ``path`` cannot take a run's outputs: it, a parent or
    one of ``children`` is a file, or it is not writable. Creates ``path``."""
    path = Path(path)
    for p in (path, *path.parents, *(path / c for c in children)):
        if p.exists() and not p.is_dir():
            raise ValueError(f"output_dir: {p} exists and is not a directory")
    probe = path / f".fastpeft-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"output_dir: cannot write to {path} ({err.strerror or err})") from err


def save_or_rescue(save: Callable[[Path], Path], target: Path, what: str) -> Path:
    """``save(target)``; if that fails, ``save`` into a sibling directory, else the system temp
    directory, and raise :class:`FinalSaveError` saying where the weights are."""
    try:
        return save(target)
    except Exception as err:  # whatever broke the save, the weights must not be lost
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        stamp = f"rescued-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        for fallback in (
            target.parent / f"{target.name}.{stamp}",
            Path(tempfile.gettempdir()) / f"fastpeft-{what.replace(' ', '-')}-{stamp}",
        ):
            try:
                saved = save(fallback)
            except Exception:
                continue
            raise FinalSaveError(
                f"could not save the {what} to {target} ({reason}); it was saved to {saved} instead"
            ) from err
        raise FinalSaveError(
            f"could not save the {what} to {target} ({reason}), nor beside it, nor in "
            f"{tempfile.gettempdir()}; the last checkpoint (if any) is all that is left"
        ) from err


def save_pretrained(
    model: nn.Module, target: Path, tokenizer: Any = None, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """``model.save_pretrained`` (safetensors) + the tokenizer, raising where transformers only logs
    (a target that is a file) and checking that the weights were written."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    model.save_pretrained(target, safe_serialization=True, state_dict=state_dict)
    if not any(target.glob("model*.safetensors")):
        raise OSError(f"no model weights were written to {target}")
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target


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


def write_main_state(
    tmp: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    scheduler: Any,
    trainer_state: dict[str, Any],
    save_adapter: bool,
) -> None:
    """Rank 0 writes the model, optimizer (or an already gathered optimizer state dict, see
    :func:`fastpeft.training.distributed.full_optimizer_state`), scheduler and trainer state."""
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    if save_adapter:
        import fastpeft

        fastpeft.save_adapter(model, str(tmp / "adapter"))
    torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, default=str))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """``manifest.json``: ``{relative path: {"bytes", "sha256"}}`` of every file in ``directory``."""
    files = sorted(f for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST)
    entries = {str(f.relative_to(directory)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": entries}, indent=1))


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (a missing, truncated or altered file), or None."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        missing = [n for n in REQUIRED if not (path / n).is_file()]
        return f"{missing[0]} is missing" if missing else None  # written before manifests existed
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name in REQUIRED:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, size, digest in entries:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
        if _sha256(f) != digest:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def commit_checkpoint(ckpt_root: Path, tmp: Path, step: int, keep: int | None) -> Path:
    """Write the manifest, rename ``tmp`` into ``step-NNNNNN``, point ``latest`` at it, keep the
    ``keep`` newest checkpoints (None or 0: all)."""
    if keep is not None and keep < 0:
        raise ValueError(f"keep_checkpoints must be null, 0 (keep all) or positive, got {keep}")
    write_manifest(tmp)
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


def resume_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest intact checkpoint (``latest`` first) to resume from, None when there is none.
    Damaged ones are skipped with a one-line warning; ValueError when every checkpoint is damaged."""
    named = latest_checkpoint(ckpt_root)
    candidates = list(dict.fromkeys(([named] if named else []) + list_checkpoints(ckpt_root)[::-1]))
    damaged: list[str] = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                warnings.warn(f"checkpoint {'; '.join(damaged)}: resuming from {path.name} instead", stacklevel=2)
            return path
        damaged.append(f"{path.name} is damaged ({problem})")
    if damaged:
        raise ValueError(f"no intact checkpoint in {ckpt_root}: {'; '.join(damaged)}")
    return None


def warn_config_changes(
    path: Path, saved: dict[str, Any], current: dict[str, Any], fields: tuple[str, ...] = EXACT_RESUME_FIELDS
) -> None:
    """One warning line naming each field of ``fields`` whose value differs from the checkpoint's."""
    changed = [
        f"{k} {saved[k]!r} -> {current[k]!r}" for k in fields if k in saved and k in current and saved[k] != current[k]
    ]
    if changed:
        warnings.warn(
            f"resuming from {path} with {', '.join(changed)}: the run will not continue as the "
            "interrupted one would have",
            stacklevel=3,
        )


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``path``."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing trainer_state.json")
    return json.loads(state_file.read_text())


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0
) -> dict[str, Any]:
    """Restore everything saved in ``path``; returns the trainer state dict. With FSDP2 (DTensor
    parameters) every rank calls this: the full tensors are re-sharded collectively."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is damaged: {problem}")
    try:
        saved = load_file(str(path / "trainable.safetensors"))
    except Exception as err:  # safetensors' own error types: truncated or corrupted
        raise ValueError(f"checkpoint {path}: trainable.safetensors is unreadable ({err})") from err
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                    f"model expects {tuple(params[name].shape)}"
                )
            params[name].copy_(dist_utils.shard_like(tensor, params[name]))
    device = next(model.parameters()).device
    optimizer_state = _load_pt(path / "optimizer.pt", device)
    optimizer.load_state_dict(dist_utils.shard_optimizer_state(optimizer_state, optimizer))
    scheduler.load_state_dict(_load_pt(path / "scheduler.pt"))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(_load_pt(rng_file))
    else:
        warnings.warn(
            f"checkpoint {path} has no {rng_file.name}: resuming without rank {rank}'s saved RNG state, "
            "so sampling and dropout will not repeat the interrupted run",
            stacklevel=2,
        )
    return read_trainer_state(path)


def _load_pt(path: Path, device: torch.device | str = "cpu") -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated zip, or more than tensors and numbers
        raise ValueError(
            f"checkpoint file {path} is unreadable ({str(err).splitlines()[0] if str(err) else err})"
        ) from err
