"""PEFT prefix tuning on fastpeft's prefix-attention kernel (called by :func:`fastpeft.patch_peft_model`).

PEFT runs prefix tuning by handing the base model a key/value cache of P virtual tokens and a mask
widened by P ones, so every attention layer concatenates the prefix into K/V and builds a mask. The
patched PeftModel instead switches its base model (this instance only) to the ``"fastpeft_prefix"``
attention function (:mod:`fastpeft.prefix_attention_hf`): each layer reads its prefix keys/values
from PEFT's own prompt encoder (evaluated once per forward, shared across the batch), the kernel
treats the prefix as always visible, and the sequence's rotary positions start at P, which is
exactly what PEFT's cache gives. PEFT's ``forward`` is replaced on the PeftModel instance; it runs
the fused path for a plain forward (no caller cache) and PEFT's own forward otherwise
(``generate`` steps with a cache, ``output_attentions``), where the attention function then runs as
plain causal attention over PEFT's cache. ``disable_adapter()`` works as in PEFT.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from fastpeft.prefix_attention_hf import LayerPrefix, disable_prefix_attention, enable_prefix_attention, model_geometry

_STATE = "_fastpeft_prefix_patch"  # on the PeftModel instance


class _PrefixState:
    """Per-forward prefix table of one patched PeftModel and whether the fused path is running."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.running = False
        self.table: torch.Tensor | None = None  # [P, L, 2, H_kv, D]

    def begin_forward(self) -> None:
        if not self.running:
            return
        model = self.model
        config = model.active_peft_config
        encoder = model.prompt_encoder[model.active_adapter]
        tokens = model.prompt_tokens[model.active_adapter][: config.num_virtual_tokens]
        tokens = tokens.unsqueeze(0).to(encoder.embedding.weight.device)
        # PEFT's get_prompt for one row: the embedding table, or the reparameterisation MLP of it
        flat = encoder.embedding.weight.unsqueeze(0) if config.inference_mode else encoder(tokens)
        if model.base_model_torch_dtype is not None:
            flat = flat.to(model.base_model_torch_dtype)
        head_dim = config.token_dim // config.num_attention_heads
        self.table = flat.view(config.num_virtual_tokens, config.num_layers, 2, config.num_attention_heads, head_dim)

    def layer_prefix(self, layer: int, batch_size: int) -> LayerPrefix | None:
        if not self.running or self.table is None:
            return None
        return LayerPrefix(self.table[:, layer, 0], self.table[:, layer, 1])


def _why_not(model: nn.Module) -> str | None:
    config = model.active_peft_config
    base = model.get_base_model()
    try:
        num_layers, kv_heads, head_dim = model_geometry(base)
    except ValueError as err:
        return str(err)
    if config.num_transformer_submodules != 1:
        return "encoder-decoder prefix tuning is not supported"
    if (config.num_layers, config.num_attention_heads, config.token_dim) != (num_layers, kv_heads, kv_heads * head_dim):
        return (
            f"prefix config (num_layers={config.num_layers}, heads={config.num_attention_heads}, "
            f"token_dim={config.token_dim}) does not match the model's {num_layers} layers of {kv_heads} x {head_dim}"
        )
    return None


def _fused_forward(
    self: nn.Module,
    input_ids=None,
    attention_mask=None,
    inputs_embeds=None,
    labels=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    task_ids=None,
    **kwargs: Any,
):
    """The patched ``PeftModelForCausalLM.forward``: no cache, no widened mask; the kernel adds the prefix."""
    state: _PrefixState = self.__dict__[_STATE]
    config = self.active_peft_config
    usable = (
        getattr(config.peft_type, "value", config.peft_type) == "PREFIX_TUNING"
        and not self._adapters_disabled
        and kwargs.get("past_key_values") is None
        and kwargs.get("cache") is None
        and not output_attentions
        and _why_not(self) is None
    )
    if not usable:
        return type(self).forward(
            self,
            input_ids,
            attention_mask,
            inputs_embeds,
            labels,
            output_attentions,
            output_hidden_states,
            return_dict,
            task_ids,
            **kwargs,
        )
    kwargs.pop("past_key_values", None)
    state.running = True
    try:
        return self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            **kwargs,
        )
    finally:
        state.running = False
        state.table = None


def patch_prefix_tuning(model: nn.Module) -> bool:
    """Switch a prefix-tuning PeftModel to the prefix-attention kernel (ValueError naming why not)."""
    if _STATE in model.__dict__:
        return True
    reason = _why_not(model)
    if reason is not None:
        raise ValueError(f"patch_peft_model: PEFT prefix tuning cannot use fastpeft's kernel here: {reason}")
    base = model.get_base_model()
    num_layers = model_geometry(base)[0]
    state = _PrefixState(model)
    sources = {layer: (lambda batch, layer=layer: state.layer_prefix(layer, batch)) for layer in range(num_layers)}
    enable_prefix_attention(
        base,
        sources,
        model.active_peft_config.num_virtual_tokens,
        is_active=lambda: state.running,
        before_forward=state.begin_forward,
    )
    model.__dict__[_STATE] = state
    model.forward = types.MethodType(_fused_forward, model)
    return True


def unpatch_prefix_tuning(model: nn.Module) -> None:
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return
    disable_prefix_attention(model.get_base_model())
    model.__dict__.pop("forward", None)
