"""The scenarios of ``fastpeft bench``, one module each, by name.

Every module defines ``NAME``, ``TITLE``, ``IMPL_NAMES`` and ``cases(small: bool) -> list[Case]``
(cases allocate nothing until the harness runs them).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

SCENARIOS: dict[str, str] = {
    "decode-linear": "decode_linear",
    "train-linear": "train_linear",
    "prefix-attention": "prefix_attention",
    "qlora-step": "qlora_step",
    "lora-step": "lora_step",
    "sampling": "sampling",
    "trl-sft-step": "trl_sft_step",
    "multi-adapter": "multi_adapter",
    "cpu-kernels": "cpu_kernels",
    "cpu-models": "cpu_models",
    "memory": "memory",
}


class UnknownScenario(ValueError):
    """A scenario name that does not exist; the message lists the known ones."""


def resolve(names: Sequence[str] | None) -> list[ModuleType]:
    """Scenario modules for ``names`` (all when empty), in order, duplicates dropped; unknown -> error."""
    names = list(dict.fromkeys(names or SCENARIOS))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UnknownScenario(f"unknown scenario {', '.join(map(repr, unknown))}; choose from: {', '.join(SCENARIOS)}")
    return [importlib.import_module(f"{__name__}.{SCENARIOS[n]}") for n in names]
