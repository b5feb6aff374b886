"""P-Tuning v2 and dynamic mixed prompts: deep prefixes whose use is learned per layer.

Both put a gate g_l ∈ [0, 1] on layer l's prefix. The kernel applies it as an additive logit bias
log(g_l) on every prefix logit, which multiplies the prefix's share of the softmax mass by g_l:

    o_i = (g·Σ_{j<P} e^{s_ij} v_j + Σ_{k≤i} e^{s_ik} v_k) / (g·Σ_{j<P} e^{s_ij} + Σ_{k≤i} e^{s_ik})

g = 1 is ordinary prefix tuning and g = 0 is exactly plain causal attention (a value scale would
not have that property: the prefix would still take softmax mass). So a layer whose gate is 0 at
inference is dropped from the adapter by :meth:`PrefixAdapter.fold` and runs no prefix at all.

- P-Tuning v2 (:func:`add_ptuning_v2`): deep prompts in the chosen ``layers``, each with a learned
  sigmoid gate g_l = σ(w_l) (learnable insertion); penalty Σ_l g_l (L1); at inference gates below
  ``prune_below`` become 0.
- Dynamic mixed prompts (:func:`add_mixed_prompts`): a hard-concrete gate per layer (Louizos et
  al., 2018): while training u ~ U(0, 1), s = σ((log u − log(1 − u) + log α_l)/β),
  g = clamp(s·(ζ − γ) + γ, 0, 1); at inference g = clamp(σ(log α_l)·(ζ − γ) + γ, 0, 1), exactly 0
  for a small enough α; penalty = expected L0 = Σ_l σ(log α_l − β·log(−γ/ζ)).

The trainer adds ``weight · adapter.sparsity_penalty()`` to its loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.prefix_attention_hf import model_geometry
from fastpeft.prefix_tuning import PrefixAdapter, PrefixTuningConfig, attach_prefix_adapter


class SigmoidGate(nn.Module):
    """g = σ(logits) per layer; L1 penalty; inference zeroes gates below ``prune_below``."""

    kind = "sigmoid"

    def __init__(self, num_gates: int, init_logit: float = 3.0, prune_below: float = 0.05) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((num_gates,), float(init_logit)))
        self.prune_below = float(prune_below)

    def inference_gates(self) -> torch.Tensor:
        g = torch.sigmoid(self.logits)
        return torch.where(g < self.prune_below, torch.zeros_like(g), g)

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits) if self.training else self.inference_gates()

    def penalty(self) -> torch.Tensor:
        return torch.sigmoid(self.logits).sum()

    def hyperparameters(self) -> dict:
        return {"prune_below": self.prune_below}


class HardConcreteGate(nn.Module):
    """Hard-concrete gate (L0 relaxation) per layer; formulas in the module docstring."""

    kind = "hard_concrete"

    def __init__(
        self,
        num_gates: int,
        init_log_alpha: float = 2.0,
        beta: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
    ) -> None:
        super().__init__()
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise ValueError(f"hard-concrete needs gamma < 0 < 1 < zeta and beta > 0, got {gamma=}, {zeta=}, {beta=}")
        self.log_alpha = nn.Parameter(torch.full((num_gates,), float(init_log_alpha)))
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)

    def _stretch(self, s: torch.Tensor) -> torch.Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def inference_gates(self) -> torch.Tensor:
        return self._stretch(torch.sigmoid(self.log_alpha))

    def forward(self) -> torch.Tensor:
        if not self.training:
            return self.inference_gates()
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1.0 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return self._stretch(s)

    def penalty(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum()

    def hyperparameters(self) -> dict:
        return {"beta": self.beta, "gamma": self.gamma, "zeta": self.zeta}


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """Deep prompts in ``layers`` (None = all) with a learned sigmoid insertion gate per layer."""

    learn_insertion: bool = True
    gate_init_logit: float = 3.0
    prune_below: float = 0.05


@dataclass
class MixedPromptsConfig(PrefixTuningConfig):
    """Dynamic mixed prompts: a hard-concrete gate per layer decides whether and how strongly it is used."""

    gate_init_log_alpha: float = 2.0
    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1


def _build(model: nn.Module, config: PrefixTuningConfig, gate_factory) -> PrefixAdapter:
    num_layers, kv_heads, head_dim = model_geometry(model)
    adapter = PrefixAdapter(
        num_layers,
        kv_heads,
        head_dim,
        config.num_virtual_tokens,
        config.layers,
        config.prefix_projection,
        config.encoder_hidden_size,
    )
    adapter.gate = gate_factory(len(adapter.layers))
    return attach_prefix_adapter(model, adapter)


def add_ptuning_v2(model: nn.Module, config: PTuningV2Config) -> PrefixAdapter:
    """P-Tuning v2 on a Llama/Mistral/Qwen2-family model in place; returns the adapter."""
    if not config.learn_insertion:
        return _build(model, config, lambda n: None)
    return _build(model, config, lambda n: SigmoidGate(n, config.gate_init_logit, config.prune_below))


def add_mixed_prompts(model: nn.Module, config: MixedPromptsConfig) -> PrefixAdapter:
    """Dynamic mixed prompts on a Llama/Mistral/Qwen2-family model in place; returns the adapter."""
    return _build(
        model,
        config,
        lambda n: HardConcreteGate(n, config.gate_init_log_alpha, config.beta, config.gamma, config.zeta),
    )
