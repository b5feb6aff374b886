"""ModulesToSave: a fully trained copy of a module per adapter (PEFT's ``modules_to_save``).

The wrapper keeps the original module (used when adapters are disabled or the active adapter has
no copy, so the adapter-disabled model stays the base model) and one trainable deep copy per
adapter name. On disk the copy's tensors are stored as ``base_model.model.<path>.<param>``, as PEFT
does. Attribute access falls through to the original module (``.weight``, ``.in_features``...).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSave(nn.Module):
    """Routes calls to ``copies[active_adapter]`` or, when disabled / absent, to ``original``."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> nn.Module:
        if name in self.copies:
            raise ValueError(f"module to save already has a copy for adapter {name!r}")
        module = copy.deepcopy(self.original)
        module.requires_grad_(True)
        self.copies[name] = module
        if self.active_adapter is None:
            self.active_adapter = name
        return module

    def set_adapter(self, name: str | None) -> None:
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.copies), None)

    @property
    def current(self) -> nn.Module:
        """The module the forward runs now."""
        if self.disabled or self.active_adapter not in self.copies:
            return self.original
        return self.copies[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or "original" not in modules:  # mid-construction or unpickling
                raise
            return getattr(modules["original"], name)
