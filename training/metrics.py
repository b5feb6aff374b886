"""Run metrics: a JSONL log, peak memory, throughput, a loss-curve PNG and a progress bar."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory of this process: ``torch.cuda.max_memory_allocated`` on a CUDA device, else the
    peak resident set size (``ru_maxrss``; Linux reports KiB, macOS bytes)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Reset the CUDA peak counter (the CPU RSS peak cannot be reset)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class MetricsLogger:
    """Appends one JSON object per line to ``path``; on resume, drops records past the resumed step
    (a killed run may have logged steps that the resumed run will redo)."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # a killed run may have torn a line: resume drops whatever does not parse, and says so
            records, bad = _parse_lines(self.path)
            for line in bad:
                warnings.warn(f"{self.path}:{line} is not a JSON record; dropped on resume", stacklevel=2)
            kept = [r for r in records if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The records of a JSONL file and the (1-based) numbers of the lines that are not records."""
    records, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    return records, bad


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file. A torn last line (the writer was killed mid-line) is
    skipped with a warning; any other line that is not a JSON object is a ValueError naming it."""
    path = Path(path)
    records, bad = _parse_lines(path)
    last = len(path.read_text(errors="replace").splitlines())
    if bad == [last]:
        warnings.warn(f"{path}: skipping a torn last line ({last})", stacklevel=2)
    elif bad:
        raise ValueError(f"{path}:{bad[0]} is not a JSON record")
    return records


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Train (and eval, when present) loss against step, saved with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


class Throughput:
    """Tokens per second over the steps since the last call to :meth:`rate`."""

    def __init__(self) -> None:
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return rate


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train") -> Any:
    """A tqdm bar (disabled off rank 0 or when asked)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, leave=False)
