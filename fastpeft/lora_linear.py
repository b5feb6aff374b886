"""Drop-in adapter linears: :class:`AdapterLinear` (shared machinery) and :class:`LoRALinear` (dense base).

An AdapterLinear replaces an ``nn.Linear`` (or a GPT-2 ``Conv1D``, whose ``[in, out]`` weight is
transposed into our ``[out, in]`` layout and remembered as ``fan_in_fan_out``) in place. It owns the
frozen base weight and bias and any number of named adapters (``self.adapters``, an
``nn.ModuleDict`` of :class:`~fastpeft.adapters.LoraAdapter` objects — see that module for the seam
a variant such as AdaLoRA or Delta-LoRA plugs into, and :mod:`fastpeft.variants` for registering one).

Forward, for x ``[..., in]`` (leading dims flattened for the fused op):
- ``disabled`` or no active adapter: the base layer only;
- a merged adapter: the base layer only (the adapter lives in W);
- rows routed (``row_routing``, set by ``fastpeft.route_adapters``): plain LoRA adapters take one
  fused op with per-row adapter ids (:mod:`fastpeft.kernels.lora_linear_routed`: W read once, each
  row bit for bit its adapter's single-adapter result); with other variants, x·Wᵀ once, then each
  group of batch rows gets its adapter's contribution;
- otherwise the active adapter's ``forward`` (fused LoRA op; unfused with dropout > 0 in training).

The layer's dtype and device are its base weight's (the compute dtype for NF4); x must match both,
except inside ``torch.autocast``, where the layer computes in the autocast dtype like ``nn.Linear``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.adapters import LoraAdapter
from fastpeft.kernels.autocast import autocast_dtype, compute_dtype
from fastpeft.kernels.backend import tracing
from fastpeft.kernels.lora_linear_routed import lora_linear_routed
from fastpeft.kernels.nf4 import NF4Weight
from fastpeft.variants import get_variant


def linear_kind(module: nn.Module) -> str | None:
    """ "linear4bit" (bitsandbytes NF4/FP4), "conv1d" (GPT-2, weight ``[in, out]``), "linear" or None."""
    bnb = sys.modules.get("bitsandbytes")  # a model can only hold bnb layers if bnb was imported
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        return "linear4bit"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    if isinstance(module, nn.Linear) and not isinstance(module, AdapterLinear):
        return "linear" if type(module).__module__.split(".")[0] != "bitsandbytes" else None
    return None


class RowRouting:
    """Per-row adapter choice for one batch: ``row_adapters[i]`` (a name or None) for batch row i."""

    def __init__(self, row_adapters: Sequence[str | None]) -> None:
        if isinstance(row_adapters, str) or not all(a is None or isinstance(a, str) for a in row_adapters):
            raise TypeError(f"row_adapters must be a list of adapter names or None, got {row_adapters!r}")
        if len(row_adapters) == 0:
            raise ValueError("row_adapters is empty")
        self.row_adapters = list(row_adapters)
        self.batch_size = len(self.row_adapters)
        self._rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.row_adapters):
            if name is not None:
                self._rows.setdefault(name, []).append(i)
        self._by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        self._ids: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}

    def groups(self, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """(adapter name, int64 batch-row indices on ``device``) per adapter, built once per device."""
        if device not in self._by_device:
            self._by_device[device] = [(n, torch.tensor(r, device=device)) for n, r in self._rows.items()]
        return self._by_device[device]

    def adapter_ids(self, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """int64 ``[batch]``: batch row i's index in ``names`` (-1 when its adapter is not among them)."""
        key = (names, device)
        if key in self._ids:
            return self._ids[key]
        ids = torch.tensor(
            [names.index(a) if a in names else -1 for a in self.row_adapters], dtype=torch.int64, device=device
        )
        if not (torch.compiler.is_compiling() or tracing(ids)):  # a traced tensor is never kept
            self._ids[key] = ids
        return ids


class AdapterLinear(nn.Module):
    """Base class: adapters by name, active/disabled/merged state, routing, forward dispatch.

    Subclasses provide ``base_operand()``, ``dense_weight(dtype)``, ``write_base_weight(w)``,
    ``dtype``, ``device`` and ``to_dense_module(weight)``.
    """

    def __init__(self, in_features: int, out_features: int, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = in_features, out_features, fan_in_fan_out
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None
        self.row_routing: RowRouting | None = None

    # -- base layer (subclass hooks) --------------------------------------------------------------
    bias: torch.Tensor | None

    def base_operand(self) -> torch.Tensor | NF4Weight:
        raise NotImplementedError

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def write_base_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def base_needs_grad(self) -> bool:
        return False

    def get_base_layer(self) -> nn.Module:
        """The frozen base as the plain module this layer replaced (nn.Linear, GPT-2 Conv1D or a
        bitsandbytes Linear4bit) sharing this layer's tensors, as PEFT layers expose theirs. Built on
        each call and never registered as a child, so ``state_dict`` keys do not change."""
        raise NotImplementedError(f"{type(self).__name__} does not define get_base_layer()")

    @property
    def base_layer(self) -> nn.Module:
        return self.get_base_layer()

    def base_linear(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """x·Wᵀ (+ b), ``[M, in] -> [M, out]``."""
        return F.linear(x, self.dense_weight(compute_dtype(x)), self.bias if bias else None)

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        variant: str = "lora",
        init_lora_weights: bool | str = True,
        variant_config: dict | None = None,
    ) -> LoraAdapter:
        """Create adapter ``name`` (a no-op with the default init); it becomes active if none is."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer (adapters: {list(self.adapters)})")
        adapter = get_variant(variant).adapter(
            self.in_features,
            self.out_features,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            init_lora_weights,
            dtype=self.dtype,
            device=self.device,
            **(variant_config or {}),
        )
        adapter.init_from_layer(self)
        adapter.train(self.training)
        self.adapters[name] = adapter
        if self.active_adapter is None:
            self.active_adapter = name
        return adapter

    def _get(self, name: str) -> LoraAdapter:
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r} in this layer (adapters: {list(self.adapters)})")
        return self.adapters[name]  # type: ignore[return-value]

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: base layer only)."""
        if name is not None:
            self._get(name)
        if self.merged_adapter is not None and name != self.merged_adapter:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged; unmerge() before switching to {name!r}")
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        self._get(name)
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge() before deleting it")
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    @property
    def active(self) -> LoraAdapter:
        """The active adapter object (RuntimeError if there is none)."""
        if self.active_adapter is None or self.active_adapter not in self.adapters:
            raise RuntimeError(f"no active adapter (adapters: {list(self.adapters)})")
        return self.adapters[self.active_adapter]  # type: ignore[return-value]

    @property
    def lora_A(self) -> nn.Parameter:
        """Active adapter's A ``[r, in]``."""
        return self.active.lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        """Active adapter's B ``[out, r]``."""
        return self.active.lora_B

    @property
    def scaling(self) -> float:
        return self.active.scaling

    def adapter_params(self, name: str | None = None) -> list[nn.Parameter]:
        """Parameters of adapter ``name`` (default: the active one)."""
        adapter = self.active if name is None else self._get(name)
        return list(adapter.parameters())

    # -- merge ------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter_name: str | None = None) -> None:
        """Fold the adapter (default: the active one) into the base weight; forward then skips it."""
        name = adapter_name or self.active_adapter
        if name is None:
            raise ValueError("nothing to merge: no active adapter")
        adapter = self._get(name)
        if self.merged_adapter == name:
            return
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is already merged; unmerge() first")
        merged = adapter.merge_into(self, self.dense_weight(torch.float32).float())
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {name!r} produced NaN/inf weights; the adapter looks broken")
        self.write_base_weight(merged)
        self.merged_adapter, self.active_adapter = name, name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (no-op when nothing is merged)."""
        if self.merged_adapter is None:
            return
        adapter = self._get(self.merged_adapter)
        self.write_base_weight(adapter.unmerge_from(self, self.dense_weight(torch.float32).float()))
        self.merged_adapter = None

    # -- forward ----------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects x [..., {self.in_features}], got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the {type(self).__name__} is on {self.device}")
        if x.dtype != self.dtype and not (x.is_floating_point() and autocast_dtype(x.device) is not None):
            raise TypeError(f"x is {x.dtype} but the {type(self).__name__} computes in {self.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        self._check_input(x)
        if self.disabled and self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged into the weight; unmerge() before disabling")
        if self.row_routing is not None and not self.disabled:
            return self._routed_forward(x)
        x2d = x.reshape(-1, self.in_features)
        use_adapter = not self.disabled and self.merged_adapter is None and self.active_adapter in self.adapters
        y = self.adapters[self.active_adapter](self, x2d) if use_adapter else self.base_linear(x2d)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of one batch through different adapters; the base matmul runs once for all of them."""
        routing = self.row_routing
        if x.dim() < 2 or x.shape[0] != routing.batch_size:
            raise ValueError(f"route_adapters got {routing.batch_size} row adapters but x has shape {tuple(x.shape)}")
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged; unmerge() before routing rows")
        names = tuple(name for name, _ in routing.groups(x.device) if name in self.adapters)
        adapters = [self.adapters[name] for name in names]
        if (
            names
            and not self.base_needs_grad()
            and all(type(a) is LoraAdapter and not a.dropout_active() for a in adapters)
        ):
            # plain LoRA: one fused op with per-row adapter ids (the base weight read once)
            ids = routing.adapter_ids(names, x.device).repeat_interleave(x[0].numel() // self.in_features)
            y = lora_linear_routed(
                x.reshape(-1, self.in_features),
                self.base_operand(),
                self.bias,
                ids,
                [a.lora_A for a in adapters],
                [a.lora_B for a in adapters],
                [a.scaling for a in adapters],
            )
            return y.reshape(*x.shape[:-1], self.out_features)
        base = F.linear(x, self.dense_weight(compute_dtype(x)))  # [B, ..., out], no bias
        y = base if self.bias is None else base + self.bias
        for name, rows in routing.groups(x.device):
            if name not in self.adapters:
                continue  # this layer is not adapted by that adapter
            x_rows = x.index_select(0, rows)
            base_rows = base.index_select(0, rows)
            delta = self.adapters[name].contribution(
                self, x_rows.reshape(-1, self.in_features), base_rows.reshape(-1, self.out_features)
            )
            y = y.index_add(0, rows, delta.reshape(base_rows.shape))
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"active={self.active_adapter!r}, disabled={self.disabled}, merged={self.merged_adapter!r}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )


def _plain_dense_module(weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool) -> nn.Module:
    """nn.Linear (or GPT-2 Conv1D when ``fan_in_fan_out``) holding ``weight [out, in]`` and ``bias``,
    frozen like the base layer it replaces."""
    out_features, in_features = weight.shape
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        module: nn.Module = Conv1D(out_features, in_features).to(device=weight.device, dtype=weight.dtype)
        module.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        module.bias = nn.Parameter(
            bias.detach() if bias is not None else weight.new_zeros(out_features), requires_grad=False
        )
        return module
    module = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    module.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return module


class LoRALinear(AdapterLinear):
    """Dense frozen base W ``[out, in]`` (shared with the wrapped nn.Linear, not copied) + adapters."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, fan_in_fan_out: bool = False) -> None:
        if weight.dim() != 2:
            raise ValueError(f"LoRALinear needs a 2-D weight [out, in], got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"LoRALinear needs a floating-point weight, got {weight.dtype}")
        super().__init__(weight.shape[1], weight.shape[0], fan_in_fan_out)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
        self.bias = None if bias is None else (bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias))
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def wrap(cls, linear: nn.Module) -> LoRALinear:
        """An adapter-less LoRALinear around ``linear`` (nn.Linear shares its weight; Conv1D is transposed)."""
        kind = linear_kind(linear)
        if kind == "linear":
            return cls(linear.weight, linear.bias)
        if kind == "conv1d":
            return cls(nn.Parameter(linear.weight.detach().t().contiguous()), linear.bias, fan_in_fan_out=True)
        raise TypeError(f"LoRALinear wraps nn.Linear or GPT-2 Conv1D, got {type(linear).__name__}")

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        use_dora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
    ) -> LoRALinear:
        """Wrap ``linear`` with one adapter ``adapter_name`` (a no-op until trained)."""
        layer = cls.wrap(linear)
        layer.add_adapter(
            adapter_name,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            variant="dora" if use_dora else "lora",
            init_lora_weights=init_lora_weights,
        )
        return layer

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def base_operand(self) -> torch.Tensor:
        return self.weight

    def base_needs_grad(self) -> bool:
        return self.weight.requires_grad

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)

    def write_base_weight(self, weight: torch.Tensor) -> None:
        # in place: optimizers and tied references keep pointing at the same Parameter
        self.weight.data.copy_(weight.to(self.weight.dtype))

    def get_base_layer(self) -> nn.Module:
        if not self.fan_in_fan_out:  # the very same Parameters
            module = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
            module.weight, module.bias = self.weight, self.bias
            return module
        return _plain_dense_module(self.weight.detach(), self.bias, fan_in_fan_out=True)

    def to_dense_module(self, weight: torch.Tensor | None = None) -> nn.Module:
        """A plain nn.Linear / Conv1D with ``weight`` (default: the current base weight)."""
        weight = self.weight.detach() if weight is None else weight.to(self.dtype)
        return _plain_dense_module(weight, self.bias, self.fan_in_fan_out)


def iter_adapter_layers(module: nn.Module) -> Iterable[tuple[str, AdapterLinear]]:
    """(path, layer) for every AdapterLinear inside ``module``."""
    for name, child in module.named_modules():
        if isinstance(child, AdapterLinear):
            yield name, child
