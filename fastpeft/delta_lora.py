"""Delta-LoRA: the frozen base weight follows the low-rank update (Zi et al., 2023).

The adapter is plain LoRA (same parameters, PEFT shapes, the fused ``lora_linear`` forward), but
after every optimizer step the base weight also receives the change of the adapter's product:

    W_{t+1} = W_t + λ·s·(B_{t+1}·A_{t+1} − B_t·A_t)          (W ``[out, in]``, A ``[r, in]``, B ``[out, r]``)

with s the LoRA scaling and λ = ``update_ratio`` (variant_config, default 1; the paper uses 2).
W never needs a gradient: the update is B·A's difference, computed from snapshots of A and B
taken before the step. The trainer drives it with :class:`DeltaLoraUpdater`::

    updater = DeltaLoraUpdater(model)
    loss.backward()
    updater.step(optimizer)          # = before_step(); optimizer.step(); after_step()
    optimizer.zero_grad()

The base must be a dense weight: an NF4 (or bitsandbytes 4-bit) base cannot absorb small updates,
so injecting Delta-LoRA there raises a ValueError. The difference is computed in fp32 (fp64 for an
fp64 W) and rounded once into W's dtype, so a bf16 W drops updates below its resolution (as any
bf16 weight update does). Merge and unmerge are LoRA's (W ± s·B·A) on the updated W. A saved
adapter is a plain PEFT LoRA file (its A, B); the trained model is W plus that adapter, so save
the updated base weights too (e.g. ``merge_and_unload`` then ``save_pretrained``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastpeft.adapters import LoraAdapter
from fastpeft.kernels.nf4 import NF4Weight
from fastpeft.lifecycle import active_adapter
from fastpeft.lora_linear import LoRALinear, iter_adapter_layers
from fastpeft.variants import register_variant


class DeltaLoraAdapter(LoraAdapter):
    """LoRA factors A ``[r, in]``, B ``[out, r]`` whose product's change also updates W (dense only)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        update_ratio: float = 1.0,
    ) -> None:
        if isinstance(update_ratio, bool) or not isinstance(update_ratio, (int, float)) or not update_ratio > 0:
            raise ValueError(
                f"Delta-LoRA variant_config['update_ratio'] must be a positive number, got {update_ratio!r}"
            )
        super().__init__(
            in_features,
            out_features,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            init_lora_weights,
            dtype=dtype,
            device=device,
        )
        self.update_ratio = float(update_ratio)

    def init_from_layer(self, layer: nn.Module) -> None:
        """Refuse a base weight that Delta-LoRA cannot update in place (NF4 / 4-bit)."""
        if isinstance(layer.base_operand(), NF4Weight) or not isinstance(layer, LoRALinear):
            raise ValueError(
                f"Delta-LoRA updates the base weight every step and needs a dense one; this layer's base is "
                f"{type(layer).__name__} (NF4). Use variant 'lora' with quantize='nf4', or a dense model"
            )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", update_ratio={self.update_ratio}"


def _check_delta_lora_config(config: Any) -> None:
    if config.quantize is not None:
        raise ValueError("LoraConfig.variant 'delta_lora' updates the base weights and cannot use quantize='nf4'")


register_variant("delta_lora", DeltaLoraAdapter, normalize=_check_delta_lora_config)


class DeltaLoraUpdater:
    """Applies W += λ·s·(B'A' − BA) to every layer holding Delta-LoRA adapter ``adapter_name``.

    ``adapter_name`` defaults to the model's active adapter. Call :meth:`before_step` right before
    ``optimizer.step()`` and :meth:`after_step` right after it, or :meth:`step` for both.
    """

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        name = adapter_name or active_adapter(model)
        self.adapter_name = name
        self.layers: list[tuple[str, LoRALinear, DeltaLoraAdapter]] = [
            (path, layer, layer.adapters[name])
            for path, layer in iter_adapter_layers(model)
            if name in layer.adapters and isinstance(layer.adapters[name], DeltaLoraAdapter)
        ]
        if not self.layers:
            raise ValueError(f"the model has no Delta-LoRA adapter named {name!r}")
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
        return torch.promote_types(weight.dtype, torch.float32)

    @torch.no_grad()
    def before_step(self) -> None:
        """Remember A and B (as they are before the optimizer moves them)."""
        for path, layer, _ in self.layers:
            if layer.merged_adapter is not None:
                raise RuntimeError(f"{path}: adapter {layer.merged_adapter!r} is merged; unmerge() before training")
        self._snapshot = [
            (
                adapter.lora_A.to(self._compute_dtype(layer.weight), copy=True),
                adapter.lora_B.to(self._compute_dtype(layer.weight), copy=True),
            )
            for _, layer, adapter in self.layers
        ]

    @torch.no_grad()
    def after_step(self) -> None:
        """W += λ·s·(B_new·A_new − B_old·A_old).

        Computed as (B_new − B_old)·A_new + B_old·(A_new − A_old), one rank-2r GEMM
        ``[ΔB, B_old]·[A_new; ΔA]``: no cancellation between two large products, and exactly zero
        when the optimizer skipped the step (e.g. a GradScaler overflow).
        """
        if self._snapshot is None:
            raise RuntimeError("DeltaLoraUpdater.after_step() without before_step(): call it before optimizer.step()")
        for (_, layer, adapter), (a_old, b_old) in zip(self.layers, self._snapshot):
            dtype = a_old.dtype
            a_new, b_new = adapter.lora_A.to(dtype), adapter.lora_B.to(dtype)
            a = torch.cat([a_new, a_new - a_old])  # [2r, in]
            b = torch.cat([b_new - b_old, b_old], dim=1)  # [out, 2r]
            delta = torch.mm(b, a).mul_(adapter.update_ratio * adapter.scaling)
            if layer.weight.dtype == dtype:
                layer.weight.add_(delta)
            else:
                layer.weight.copy_(layer.weight.to(dtype).add_(delta))  # one rounding into W's dtype
        self._snapshot = None

    def step(self, optimizer: torch.optim.Optimizer, closure: Any = None) -> Any:
        """``before_step(); optimizer.step(closure); after_step()``; returns what the optimizer returns."""
        self.before_step()
        result = optimizer.step(closure) if closure is not None else optimizer.step()
        self.after_step()
        return result
