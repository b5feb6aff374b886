"""Prefix tuning: learned per-layer key/value prefixes, run by the fused prefix-attention kernel.

The learned tensor has PEFT's layout: ``prefix_embeddings [P, L·2·H_kv·D]`` where each row holds,
for every adapted layer in order, the key then the value of one virtual token, heads-major
(PEFT's ``prompt_embeddings``; viewed as ``[P, L, 2, H_kv, D]``). With ``prefix_projection`` the
table is instead produced by PEFT's reparameterisation MLP from ``embedding [P, H_kv·D]``:
``Linear(H_kv·D → encoder_hidden_size) → tanh → Linear(→ L·2·H_kv·D)``; :meth:`PrefixAdapter.fold`
evaluates it once and keeps only the table, for inference or export.

Keys/values are used as stored (post-rope, as PEFT stores cache entries) and the sequence's rotary
positions start at P: see :mod:`fastpeft.prefix_attention_hf`. An optional per-layer gate
(P-Tuning v2, dynamic mixed prompts; :mod:`fastpeft.mixed_prompts`) scales each layer's prefix
share of the attention through a logit bias log(g); a layer whose gate is 0 runs plain causal
attention.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.prefix_attention_hf import (
    LayerPrefix,
    disable_prefix_attention,
    enable_prefix_attention,
    model_geometry,
)

ADAPTER_ATTR = "fastpeft_prefix"
# a gate of exactly 0 while training still needs a finite logit bias (and gradient); e^-27.6 ≈ 1e-12
_MIN_GATE = 1e-12


@dataclass
class PrefixTuningConfig:
    """PEFT's prefix-tuning fields (same names) plus ``layers``: adapt only these layer indices
    (None = every layer, as PEFT)."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # PEFT's default: H_kv·D
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")


class PrefixAdapter(nn.Module):
    """Per-layer K/V prefixes for the layers in ``layers`` of a decoder with ``num_layers`` layers.

    gate: optional module with ``forward() -> [len(layers)]`` gates in [0, 1] (stochastic while
    training if it likes), ``penalty()`` and ``inference_gates()``.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_virtual_tokens: int,
        layers: list[int] | None = None,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        layers = list(range(num_layers)) if layers is None else sorted({int(i) for i in layers})
        if not layers or layers[0] < 0 or layers[-1] >= num_layers:
            raise ValueError(f"layers must be a non-empty subset of 0..{num_layers - 1}, got {layers}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        self.layers = layers
        self.prefix_projection = prefix_projection
        token_dim = num_kv_heads * head_dim
        self.encoder_hidden_size = encoder_hidden_size or token_dim
        width = len(layers) * 2 * token_dim
        if prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, self.encoder_hidden_size), nn.Tanh(), nn.Linear(self.encoder_hidden_size, width)
            )
        else:
            # N(0, 1) like PEFT's nn.Embedding
            self.prefix_embeddings = nn.Parameter(torch.randn(num_virtual_tokens, width))
        self.gate = gate
        self.register_buffer("folded_logit_bias", None)
        self.disabled = False
        self._step: tuple[torch.Tensor, torch.Tensor | None, list[bool] | None] | None = None
        self._model_ref: weakref.ref | None = None

    @property
    def slot_of_layer(self) -> dict[int, int]:
        return {layer: i for i, layer in enumerate(self.layers)}

    def kv_table(self) -> torch.Tensor:
        """The prefixes as ``[P, len(layers), 2, H_kv, D]`` (a view of the parameter when not projected)."""
        if self.prefix_projection:
            flat = self.transform(self.embedding.weight)
        else:
            flat = self.prefix_embeddings
        return flat.view(self.num_virtual_tokens, len(self.layers), 2, self.num_kv_heads, self.head_dim)

    def gate_values(self) -> torch.Tensor | None:
        """Current per-layer gates ``[len(layers)]`` (None without a gate)."""
        return None if self.gate is None else self.gate()

    def sparsity_penalty(self) -> torch.Tensor:
        """The gate's sparsity penalty (expected L0 or L1, see the gate) for the trainer to add to the
        loss, times its own weight; a zero tensor without a gate."""
        if self.gate is None:
            return next(self.parameters()).new_zeros(())
        return self.gate.penalty()

    def begin_forward(self) -> None:
        """Compute this forward's table, logit biases and pruned layers once (gates are sampled once
        per forward, so gradient-checkpoint recomputation sees the same values)."""
        table = self.kv_table()
        bias, pruned = self.folded_logit_bias, None
        gates = self.gate_values()
        if gates is not None:
            bias = torch.log(gates.clamp_min(_MIN_GATE))
            if not self.training:
                pruned = (gates == 0).tolist()
        self._step = (table, bias, pruned)

    def layer_prefix(self, layer: int, batch_size: int) -> LayerPrefix | None:
        """The prefix of decoder layer ``layer`` (shared across the batch), or None for plain attention."""
        slot = self.slot_of_layer.get(layer)
        if slot is None:
            return None
        if self._step is None:
            self.begin_forward()
        table, bias, pruned = self._step
        if pruned is not None and pruned[slot]:
            return None
        return LayerPrefix(table[:, slot, 0], table[:, slot, 1], None if bias is None else bias[slot : slot + 1])

    @torch.no_grad()
    def fold(self) -> None:
        """Inference form: evaluate the reparameterisation MLP into a plain table and the gate into
        fixed logit biases, dropping layers whose gate is 0 (they then cost nothing)."""
        table = self.kv_table().detach()
        keep = torch.ones(len(self.layers), dtype=torch.bool, device=table.device)
        bias = self.folded_logit_bias
        if self.gate is not None:
            gates = self.gate.inference_gates().detach()
            keep = gates > 0
            bias = torch.log(gates[keep])
            self.gate = None
        if self.prefix_projection:
            del self.embedding, self.transform
            self.prefix_projection = False
        else:
            del self.prefix_embeddings
        self.layers = [layer for layer, k in zip(self.layers, keep.tolist()) if k]
        kept = table[:, keep]
        self.prefix_embeddings = nn.Parameter(kept.reshape(self.num_virtual_tokens, kept[0].numel()).clone())
        self.folded_logit_bias = None if bias is None else bias.clone()
        self._step = None

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable tensors of this adapter."""
        return [p for p in self.parameters() if p.requires_grad]

    def remove(self) -> None:
        """Detach from the model: previous attention implementation, no hooks, no adapter module."""
        model = self._model_ref() if self._model_ref is not None else None
        if model is None:
            raise ValueError("this adapter is not attached to a live model")
        disable_prefix_attention(model)
        delattr(model, ADAPTER_ATTR)
        self._model_ref = None


def attach_prefix_adapter(model: nn.Module, adapter: PrefixAdapter, freeze_base: bool = True) -> PrefixAdapter:
    """Install ``adapter`` on ``model`` (in place): a child module ``model.fastpeft_prefix``, the
    prefix attention function, the rotary offset P. The base model's parameters are frozen."""
    num_layers, kv_heads, head_dim = model_geometry(model)
    got = (adapter.num_layers, adapter.num_kv_heads, adapter.head_dim)
    if got != (num_layers, kv_heads, head_dim):
        raise ValueError(
            f"prefix built for (num_layers, num_key_value_heads, head_dim) = {got} but the model has "
            f"{(num_layers, kv_heads, head_dim)}"
        )
    if hasattr(model, ADAPTER_ATTR):
        raise ValueError(f"model already has a {ADAPTER_ATTR!r} adapter; call .remove() on it first")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    param = next(model.parameters())
    adapter.to(param.device)
    adapter.train(model.training)  # a gate must not sample when the model is in eval mode
    sources = {layer: (lambda batch, layer=layer: adapter.layer_prefix(layer, batch)) for layer in range(num_layers)}
    enable_prefix_attention(
        model,
        sources,
        adapter.num_virtual_tokens,
        is_active=lambda: not adapter.disabled,
        before_forward=adapter.begin_forward,
    )
    model.add_module(ADAPTER_ATTR, adapter)
    adapter._model_ref = weakref.ref(model)
    return adapter


def add_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> PrefixAdapter:
    """Add prefix tuning to a Llama/Mistral/Qwen2-family model in place; returns the adapter."""
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
    return attach_prefix_adapter(model, adapter)
