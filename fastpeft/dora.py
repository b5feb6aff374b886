"""DoRA (weight-decomposed LoRA) as PEFT 0.21 computes it (peft/tuners/lora/dora.py).

With V = W + s·B·A and a trainable magnitude m ``[out]`` (PEFT's ``lora_magnitude_vector``):

    scale = m / ||V||_row          (the norm is detached from the graph, DoRA paper §4.3)
    y     = scale ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b

which runs on the fused LoRA op (called without bias; rows scaled afterwards, then the bias added).
With dropout > 0 in training mode PEFT applies dropout to the input of both the adapter and the
rescaled base term: y = base(x) + (scale - 1) ⊙ (dropout(x)·Wᵀ) + scale ⊙ s·B·A·dropout(x); that
unfused path is used then. The norm needs the dense W every forward (an NF4 base is dequantized
for it), as in PEFT.

Merging (as PEFT): W' = (m / ||W + ΔW||) ⊙ (W + ΔW); unmerging divides by the factor computed at
merge time (kept on the adapter) and subtracts ΔW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.adapters import LoraAdapter
from fastpeft.kernels.lora_linear import lora_linear


class DoraAdapter(LoraAdapter):
    """LoRA factors A ``[r, in]``, B ``[out, r]`` plus the magnitude vector ``magnitude [out]``."""

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
    ) -> None:
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
        self.magnitude = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device))
        self._merge_norm: torch.Tensor | None = None  # ||W + ΔW|| at merge time, for unmerge

    @torch.no_grad()
    def init_from_layer(self, layer: nn.Module) -> None:
        """m = ||W + s·B·A||_row, so a fresh DoRA adapter changes nothing (PEFT's initialisation)."""
        weight = layer.dense_weight(torch.float32)
        self.magnitude.copy_(self._weight_norm(weight).to(self.magnitude.dtype))

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s·B·A|| per output row ``[out]`` in ``weight``'s dtype, detached."""
        dtype = weight.dtype
        lora_weight = self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)
        return torch.linalg.norm(weight.detach() + self.scaling * lora_weight, dim=1).to(dtype)

    def _scale(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W + s·B·A|| ``[out]``; gradients reach m only."""
        return self.magnitude / self._weight_norm(weight)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        weight = layer.dense_weight(x.dtype)
        scale = self._scale(weight)
        if self.dropout_active() or layer.base_needs_grad():
            dropped = self.dropout(x)
            return layer.base_linear(x) + (scale - 1) * F.linear(dropped, weight) + scale * self.lora_output(dropped)
        y = lora_linear(x, layer.base_operand(), None, self.lora_A, self.lora_B, self.scaling) * scale
        return y if layer.bias is None else y + layer.bias

    def contribution(self, layer: nn.Module, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        weight = layer.dense_weight(x.dtype)
        scale = self._scale(weight)
        if self.dropout_active():
            dropped = self.dropout(x)
            return (scale - 1) * F.linear(dropped, weight) + scale * self.lora_output(dropped)
        return (scale - 1) * base + scale * self.lora_output(x)

    @torch.no_grad()
    def merge_into(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        combined = weight + self.delta_weight().to(weight.device)
        self._merge_norm = torch.linalg.norm(combined, dim=1)
        factor = self.magnitude.float() / self._merge_norm
        return factor.view(-1, 1) * combined

    @torch.no_grad()
    def unmerge_from(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        if self._merge_norm is None:
            raise RuntimeError("this DoRA adapter was not merged (no weight norm recorded), cannot unmerge")
        factor = self.magnitude.float() / self._merge_norm.to(weight.device)
        self._merge_norm = None
        return weight / factor.view(-1, 1) - self.delta_weight().to(weight.device)

    @classmethod
    def peft_shapes(cls, r: int, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        return {**super().peft_shapes(r, in_features, out_features), "lora_magnitude_vector": (out_features,)}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(), "lora_magnitude_vector": self.magnitude}
