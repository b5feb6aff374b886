"""One adapter (its parameters and its maths) — the seam that LoRA variants plug into.

An :class:`~fastpeft.lora_linear.AdapterLinear` (``LoRALinear`` dense base, ``QLoRALinear`` NF4
base) owns the frozen base weight W ``[out, in]`` and bias, and an ``nn.ModuleDict`` of adapters by
name. Each adapter object holds only its own parameters and answers these calls (``layer`` is the
owning AdapterLinear; x is always 2-D ``[M, in]``):

- ``forward(layer, x) -> [M, out]``: the layer's whole output (base + bias + adapter); plain LoRA
  takes the fused ``fastpeft.kernels.lora_linear.lora_linear`` op here;
- ``contribution(layer, x, base) -> [M, out]``: what the adapter adds to ``base = x·Wᵀ`` (no bias);
  used when batch rows are routed to different adapters and the base matmul runs once;
- ``delta_weight() -> [out, in]``: the fp32 low-rank update (s·B·A for LoRA);
- ``merge_into(layer, w) -> w'`` / ``unmerge_from(layer, w') -> w`` on fp32 dense weights;
- ``peft_shapes(r, in, out)`` (a classmethod) / ``peft_tensors()`` / ``load_peft_tensors(tensors)``:
  the tensors under their PEFT key suffixes (``lora_A.weight``, ``lora_B.weight``, ...), used by
  adapter_io (the shapes check a file before anything is loaded);
- ``init_from_layer(layer)``: called once after construction (DoRA sets its magnitude here).

A variant (AdaLoRA, Delta-LoRA, ...) subclasses :class:`LoraAdapter`, overrides what differs and
registers itself with :func:`fastpeft.variants.register_variant` (which also carries its config
normalisation and on-disk format); ``LoraConfig.variant`` and ``variant_config`` select and
configure it. Keyword-only constructor arguments (besides ``dtype``, ``device``) are its settings.
Layer access available to adapters: ``layer.base_operand()`` (dense tensor or NF4Weight for the
fused op), ``layer.dense_weight(dtype)``, ``layer.base_linear(x, bias=True)``, ``layer.bias``,
``layer.base_needs_grad()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.kernels.lora_linear import lora_linear


def check_rank(r: object) -> int:
    """Return ``r`` if it is a positive int, else raise a ValueError naming it."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    return r


class LoraAdapter(nn.Module):
    """LoRA: y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with A ``[r, in]``, B ``[out, r]``.

    s = alpha/r, or alpha/sqrt(r) with rsLoRA. With dropout > 0 in training mode the fused kernel
    cannot be used (dropout applies to the adapter's input only), so the slower unfused path
    y = base(x) + s·B(A(dropout(x))) runs; in eval mode or with dropout 0 the fused op runs.
    """

    variant = "lora"  # set by register_variant to the name the variant is registered under

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
        super().__init__()
        check_rank(r)
        if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.use_rslora = lora_alpha, use_rslora
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.dropout: nn.Module = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_parameters(init_lora_weights)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @torch.no_grad()
    def reset_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initialisations: True = kaiming-uniform(a=sqrt 5) A and zero B (a no-op adapter),
        "gaussian" = N(0, 1/r) A and zero B, False = both random (nn.Linear's default, for tests)."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        elif init_lora_weights in (True, False):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def init_from_layer(self, layer: nn.Module) -> None:
        """Hook run once the adapter is attached to ``layer`` (nothing to do for plain LoRA)."""

    def dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """s·(x·Aᵀ)·Bᵀ, ``[M, in] -> [M, out]`` (no dropout)."""
        return self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The layer's output for ``x [M, in]`` with this adapter: ``[M, out]``."""
        if self.dropout_active() or layer.base_needs_grad():
            # unfused: dropout only on the adapter's input / a trainable base weight needs its grad
            return layer.base_linear(x) + self.lora_output(self.dropout(x))
        return lora_linear(x, layer.base_operand(), layer.bias, self.lora_A, self.lora_B, self.scaling)

    def contribution(self, layer: nn.Module, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to ``base = x·Wᵀ`` (``[M, out]``, no bias)."""
        return self.lora_output(self.dropout(x))

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in fp32, ``[out, in]``."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge_into(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """fp32 ``[out, in]`` base weight -> merged weight."""
        return weight + self.delta_weight().to(weight.device)

    def unmerge_from(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merge_into` (exact up to rounding)."""
        return weight - self.delta_weight().to(weight.device)

    @classmethod
    def peft_shapes(cls, r: int, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors PEFT stores for one adapted ``[out, in]`` layer, by key suffix."""
        return {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors (already checked against :meth:`peft_shapes`) into the parameters."""
        for suffix, param in self.peft_tensors().items():
            param.copy_(tensors[suffix].to(device=param.device, dtype=param.dtype))

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"scaling={self.scaling:.4g}, rslora={self.use_rslora}"
        )
