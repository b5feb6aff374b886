"""``fastpeft info [PATH]``: versions, device and kernel backend; with PATH, what it holds (an
adapter directory, a model directory, a training run or one of its checkpoints)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

from fastpeft.cli.common import config_help, format_bytes, json_object, print_kv, run_cli
from fastpeft.training.config_io import ConfigError, parse_cli

_PACKAGES = ("fastpeft", "torch", "triton", "transformers", "bitsandbytes", "peft", "safetensors", "liger-kernel")


@dataclasses.dataclass
class InfoConfig:
    path: str | None = dataclasses.field(default=None, metadata={"path": True})


def environment() -> list[tuple[str, Any]]:
    """(name, value) rows: Python, package versions, devices, kernel backend."""
    import torch

    rows: list[tuple[str, Any]] = [("python", platform.python_version())]
    for pkg in _PACKAGES:
        try:
            rows.append((pkg, importlib.metadata.version(pkg)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((pkg, "not installed"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{props.name}, {format_bytes(props.total_memory)}"))
        rows.append(("kernels", "Triton on CUDA tensors"))
    else:
        from fastpeft.kernels.backend import interpreting

        rows.append(("device", "CPU only (no CUDA)"))
        rows.append(
            ("kernels", "Triton interpreter (TRITON_INTERPRET=1)" if interpreting() else "torch reference on CPU")
        )
    return rows


def describe_path(path: Path) -> list[tuple[str, Any]]:
    """Rows describing an adapter, model, run or checkpoint directory (ConfigError otherwise)."""
    if (path / "adapter_config.json").is_file():
        cfg = json_object(path / "adapter_config.json", "path")
        rows: list[tuple[str, Any]] = [("kind", f"adapter ({cfg.get('peft_type', '?')})")]
        rows += [
            (k, cfg.get(k))
            for k in ("base_model_name_or_path", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora")
        ]
        weights = path / "adapter_model.safetensors"
        if weights.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(weights), "pt") as f:
                    n = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
                    rows += [("tensors", len(list(f.keys()))), ("adapter parameters", f"{n:,}")]
            except Exception as err:  # safetensors' own error types
                raise ConfigError(f"path: {weights} is truncated or corrupted ({err})") from err
        return rows
    if (path / "config.json").is_file():
        from fastpeft.training.plan import ModelShape

        cfg = json_object(path / "config.json", "path")
        shape = ModelShape.from_config(cfg)
        return [
            ("kind", f"model ({cfg.get('model_type', '?')})"),
            ("parameters (estimate)", f"{shape.total_params():,}"),
            ("layers", shape.layers),
            ("hidden", shape.hidden),
            ("vocab", shape.vocab),
            ("dtype", cfg.get("dtype") or cfg.get("torch_dtype")),
        ]
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        from fastpeft.training.checkpoint import latest_checkpoint

        latest = latest_checkpoint(path / "checkpoints")
        state_file = latest / "trainer_state.json" if latest else state_file
    if state_file.is_file():
        state = json_object(state_file, "path")
        rows = [
            ("kind", "training checkpoint"),
            ("checkpoint", state_file.parent),
            ("step", state.get("step")),
            ("skipped steps", state.get("bad_steps")),
        ]
        cfg = state.get("config", {})
        rows += [(k, cfg.get(k)) for k in ("finetune", "model", "lr", "micro_batch_size", "grad_accum_steps")]
        metrics = path / "metrics.jsonl"
        if metrics.is_file():
            from fastpeft.training.metrics import read_metrics

            losses = [r["loss"] for r in read_metrics(metrics) if r.get("loss") is not None]
            rows.append(("last logged loss", losses[-1] if losses else None))
        return rows
    raise ConfigError(f"path: {str(path)!r} is not an adapter, model, run or checkpoint directory")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _body(argv: list[str]) -> int:
    config = parse_cli(InfoConfig, argv, positional="path")  # `fastpeft info DIR` or `--path DIR`
    details = describe_path(Path(config.path)) if config.path else None  # errors before any output
    print_kv(environment())
    if details:
        print()
        print_kv(details)
    return 0


def main(argv: list[str]) -> int:
    return run_cli("info", argv, _body, lambda: config_help(InfoConfig, "info", __doc__.split("\n\n")[0], "PATH"))
