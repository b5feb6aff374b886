"""Checks of the optimisation and output fields that the SFT config and the RL recipes' config
share, in one place: each raises a one-line ValueError naming the field.

Meanings the checks pin down: ``max_grad_norm`` None = no clipping (0 would stop learning, a
negative value would flip the gradient); ``keep_checkpoints`` None or 0 = keep every checkpoint,
N > 0 = the N newest; ``max_bad_steps`` 0 = stop at the first non-finite step.
"""

from __future__ import annotations

import math
from typing import Any

_MISSING = object()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_training_fields(config: Any) -> None:
    """Validate whichever of the shared fields ``config`` has (see the module docstring)."""

    def get(name: str) -> Any:
        return getattr(config, name, _MISSING)

    def fail(name: str, expected: str) -> None:
        raise ValueError(f"{name} must be {expected}, got {get(name)!r}")

    for name in ("max_seq_len", "micro_batch_size", "grad_accum_steps", "eval_batch_size", "log_every"):
        value = get(name)
        if value is not _MISSING and not (_number(value) and value > 0):
            fail(name, "positive")
    for name in ("max_steps", "eval_every", "save_every"):
        value = get(name)
        if value is not _MISSING and value is not None and not (_number(value) and value > 0):
            fail(name, "positive or null")
    lr = get("lr")
    if lr is not _MISSING and not (_number(lr) and math.isfinite(lr) and lr > 0):
        fail("lr", "a positive finite number")
    epochs = get("num_epochs")
    if epochs is not _MISSING and epochs is not None and not (_number(epochs) and math.isfinite(epochs) and epochs > 0):
        fail("num_epochs", "a positive number")
    norm = get("max_grad_norm")
    if norm is not _MISSING and norm is not None and not (_number(norm) and math.isfinite(norm) and norm > 0):
        fail("max_grad_norm", "a positive number, or null for no clipping (0 would stop learning)")
    for name, meaning in (("warmup_steps", ""), ("max_bad_steps", " (0: stop at the first non-finite step)")):
        value = get(name)
        if value is not _MISSING and not (_number(value) and value >= 0):
            fail(name, f"a non-negative integer{meaning}")
    keep = get("keep_checkpoints")
    if keep is not _MISSING and keep is not None and not (_number(keep) and keep >= 0):
        fail("keep_checkpoints", "null or 0 (keep all) or a positive number of newest checkpoints to keep")
    betas = get("adam_betas")
    if betas is not _MISSING and len(betas) != 2:
        raise ValueError(f"adam_betas must have two numbers, got {betas}")
