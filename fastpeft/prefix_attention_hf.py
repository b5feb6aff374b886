"""Run :func:`fastpeft.kernels.prefix_attention.prefix_attention` inside transformers models.

We register an attention function (and its mask function) under the name ``"fastpeft_prefix"``
with transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and switch one model
instance to it with ``model.set_attn_implementation``. Each attention module then asks its own
prefix source (an attribute set on that module instance, never on the class) for the layer's
prefix; a layer without one runs the same kernel as plain causal attention.

Semantics match PEFT's prefix tuning (peft 0.21): PEFT hands the model a cache holding P virtual
tokens, so the sequence's rotary positions start at P and the prefix keys/values are used as
stored (they are never rotated). We do the same without the cache: a forward pre-hook on the decoder
adds P to ``position_ids`` (to the default ``arange`` when none are given, and to the caller's
when they are, e.g. by ``generate``), and the mask function hands the kernel the ``[B, T_k]``
key-padding mask of the sequence alone (the prefix is always visible).

Where the kernel does not apply (``output_attentions``, attention dropout while training, a
prepared 4-D mask, a head dim the kernel lacks), the call runs the torch reference instead and
says why with a warning. Sliding windows shorter than P + T_k, softcapping, attention sinks and
static caches raise: neither path implements them.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastpeft.kernels.backend import backend
from fastpeft.kernels.prefix_attention import prefix_attention, prefix_attention_probs_reference
from fastpeft.kernels.prefix_attention_launch import SUPPORTED_HEAD_DIMS

ATTN_IMPLEMENTATION = "fastpeft_prefix"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_SOURCE_ATTR = "fastpeft_prefix_source"
_STATE_ATTR = "_fastpeft_prefix_state"


@dataclass
class LayerPrefix:
    """One layer's prefix: key/value ``[P, H_kv, D]`` (shared) or ``[B, P, H_kv, D]`` (per sample);
    logit_bias a one-element tensor added to the prefix logits (log of a gate), or None."""

    key: torch.Tensor
    value: torch.Tensor
    logit_bias: torch.Tensor | None = None


# batch size -> the layer's prefix, or None to run plain causal attention in that layer
PrefixSource = Callable[[int], "LayerPrefix | None"]


def register_prefix_attention() -> None:
    """Register ``"fastpeft_prefix"`` with transformers (idempotent; called when an adapter attaches)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_hf_forward)
    # the FA2 mask function hands over the 2-D key-padding mask (or None), which is what the kernel takes
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


def model_geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_key_value_heads, head_dim) of a supported decoder; ValueError otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} has no supported prefix-attention path; supported: {SUPPORTED_MODEL_TYPES}"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, head_dim


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The decoder's self-attention modules by layer index."""
    found = {
        m.layer_idx: m
        for name, m in model.named_modules()
        if name.endswith("self_attn") and isinstance(getattr(m, "layer_idx", None), int)
    }
    num_layers = model_geometry(model)[0]
    if sorted(found) != list(range(num_layers)):
        raise ValueError(f"expected self-attention modules for layers 0..{num_layers - 1}, found {sorted(found)}")
    return found


def enable_prefix_attention(
    model: torch.nn.Module,
    sources: dict[int, PrefixSource],
    num_virtual_tokens: int,
    is_active: Callable[[], bool] = lambda: True,
    before_forward: Callable[[], None] | None = None,
) -> None:
    """Switch ``model`` (this instance only) to prefix attention.

    sources: layer index -> prefix source; num_virtual_tokens: P, the rotary offset of the sequence;
    is_active: when it returns False the model runs unshifted plain causal attention (adapter
    disabled); before_forward: called once per decoder forward (adapters compute per-step state).
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError("this model already has a prefix adapter attached; remove it first")
    modules = attention_modules(model)
    for layer in sources:
        if layer not in modules:
            raise ValueError(f"prefix for layer {layer}, but the model has layers 0..{len(modules) - 1}")
    register_prefix_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for layer, module in modules.items():
        source = sources.get(layer)
        setattr(module, _SOURCE_ATTR, (lambda batch, s=source: s(batch) if is_active() else None) if source else None)

    # on the decoder (the module that turns position_ids into rotary angles), so that calls to the
    # decoder alone are shifted too and per-forward adapter state is never stale
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    arg_names = list(inspect.signature(decoder.forward).parameters)

    def shift_positions(module, args, kwargs):
        if before_forward is not None:
            before_forward()
        if not is_active():
            return args, kwargs
        kwargs = {**dict(zip(arg_names, args)), **kwargs}
        positions = kwargs.get("position_ids")
        if positions is None:
            tokens = kwargs.get("input_ids")
            embeds = kwargs.get("inputs_embeds")
            like = tokens if tokens is not None else embeds
            past = kwargs.get("past_key_values")
            past_len = past.get_seq_length() if past is not None else 0
            positions = torch.arange(past_len, past_len + like.shape[1], device=like.device).unsqueeze(0)
        elif (
            kwargs.get("attention_mask") is None
            and positions.shape[-1] > 1
            and bool((positions.diff(dim=-1) != 1).any())
        ):
            raise ValueError("packed sequences (position_ids that restart) are not supported with a prefix")
        kwargs["position_ids"] = positions + num_virtual_tokens
        return (), kwargs

    handle = decoder.register_forward_pre_hook(shift_positions, with_kwargs=True)
    setattr(model, _STATE_ATTR, (previous, handle))


def disable_prefix_attention(model: torch.nn.Module) -> None:
    """Undo :func:`enable_prefix_attention`: previous attention implementation, no hook, no sources."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this model has no prefix adapter attached")
    previous, handle = state
    handle.remove()
    for module in attention_modules(model).values():
        if hasattr(module, _SOURCE_ATTR):
            delattr(module, _SOURCE_ATTR)
    model.set_attn_implementation(previous)
    setattr(model, _STATE_ATTR, None)


def _fallback_reason(module, query, attention_mask, dropout, kwargs) -> str | None:
    if kwargs.get("output_attentions", False):
        return "output_attentions=True needs the attention weights, which the kernel never materialises"
    if dropout > 0.0 and module.training:
        return f"attention dropout p={dropout} while training is not implemented in the kernel"
    if attention_mask is not None and attention_mask.dim() == 4:
        return "a prepared 4-D attention mask was passed"
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS and backend(query) == "triton":
        return f"head_dim={query.shape[-1]} is not one of the kernel's {SUPPORTED_HEAD_DIMS}"
    return None


def prefix_attention_hf_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function: query ``[B, H_q, T_q, D]``, key/value ``[B, H_kv, T_k, D]``,
    attention_mask ``[B, T_k]`` bool (or a 4-D mask, or None). Returns (``[B, T_q, H_q, D]``, weights or None)."""
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"fastpeft_prefix attention does not implement {name}")
    if is_causal is False or not getattr(module, "is_causal", True):
        raise ValueError("fastpeft_prefix attention is causal; this module asks for bidirectional attention")
    source = getattr(module, _SOURCE_ATTR, None)
    prefix = source(query.shape[0]) if source is not None else None
    pk = pv = bias = None
    if prefix is not None:
        pk, pv, bias = prefix.key.to(query.dtype), prefix.value.to(query.dtype), prefix.logit_bias
    window = kwargs.get("sliding_window")
    n_prefix = pk.shape[-3] if pk is not None else 0
    if window is not None and n_prefix + key.shape[2] > window:
        raise ValueError(f"sliding_window={window} is shorter than prefix + keys ({n_prefix} + {key.shape[2]})")
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] != key.shape[2]:
        raise ValueError(
            f"a [B, {attention_mask.shape[1]}] padding mask for {key.shape[2]} keys (static caches are not supported)"
        )

    reason = _fallback_reason(module, query, attention_mask, dropout, kwargs)
    if reason is None:
        out = prefix_attention(query, key, value, pk, pv, attention_mask, bias, scaling)
        return out.transpose(1, 2), None
    warnings.warn(f"fastpeft_prefix attention runs the torch reference: {reason}", stacklevel=2)
    seq_mask = padding = None
    if attention_mask is not None and attention_mask.dim() == 4:
        seq_mask = attention_mask
        if attention_mask.dtype != torch.bool:  # additive: 0 where allowed, a very negative number elsewhere
            seq_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    else:
        padding = attention_mask
    probs, values, _ = prefix_attention_probs_reference(query, key, value, pk, pv, padding, bias, scaling, seq_mask)
    out = F.dropout(probs, p=dropout, training=module.training) @ values
    weights = probs if kwargs.get("output_attentions", False) else None
    return out.transpose(1, 2).contiguous(), weights
