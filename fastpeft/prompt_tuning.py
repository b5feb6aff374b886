"""Prompt tuning: P trainable virtual-token embeddings prepended to the input embeddings.

As PEFT's prompt tuning (peft 0.21) does it for causal LMs: ``inputs_embeds`` becomes
``[prompt ‖ embed(input_ids)]`` ``[B, P + T, hidden]``, the attention mask gets P leading ones, the
labels P leading -100, so the model's logits have P + T positions (the first P belong to the
virtual tokens). This is done by a forward pre-hook on the model instance; nothing is patched.

During cached decoding (the cache already holds the prompt) only the mask and given position_ids
are adjusted (P leading ones; positions + P).
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

ADAPTER_ATTR = "fastpeft_prompt"


@dataclass
class PromptTuningConfig:
    """init: "random" (normal with the word embeddings' std), "text" (the embeddings of
    ``init_text``'s tokens, repeated or cut to P, as PEFT) or "sample_vocab" (random vocab rows)."""

    num_virtual_tokens: int = 20
    init: Literal["random", "text", "sample_vocab"] = "random"
    init_text: str | None = None

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.init not in ("random", "text", "sample_vocab"):
            raise ValueError(f"init must be 'random', 'text' or 'sample_vocab', got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("init='text' needs init_text")


def _initial_prompt(config: PromptTuningConfig, word_embeddings: nn.Embedding, tokenizer: Any) -> torch.Tensor:
    weight = word_embeddings.weight.detach()
    n = config.num_virtual_tokens
    if config.init == "random":
        return torch.randn(n, weight.shape[1], device=weight.device) * weight.float().std()
    if config.init == "sample_vocab":
        ids = torch.randint(0, weight.shape[0], (n,), device=weight.device)
    else:
        if tokenizer is None:
            raise ValueError("init='text' needs a tokenizer")
        token_ids = list(tokenizer(config.init_text)["input_ids"])
        if not token_ids:
            raise ValueError(f"init_text {config.init_text!r} tokenizes to nothing")
        token_ids = (token_ids * math.ceil(n / len(token_ids)))[:n]
        ids = torch.tensor(token_ids, dtype=torch.long, device=weight.device)
    return weight[ids].float().clone()


class PromptTuningAdapter(nn.Module):
    """Holds ``prompt_embeddings [P, hidden]`` (PEFT's saved tensor) and the model hook."""

    def __init__(self, prompt: torch.Tensor) -> None:
        super().__init__()
        if prompt.dim() != 2:
            raise ValueError(f"prompt embeddings must be [P, hidden], got {tuple(prompt.shape)}")
        self.prompt_embeddings = nn.Parameter(prompt)
        self.disabled = False
        self._handle = None
        self._model_ref: weakref.ref | None = None
        self.model_shape: tuple[int, int] | None = None  # (num_layers, num_attention_heads), for PEFT's config

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable tensors of this adapter."""
        return [p for p in self.parameters() if p.requires_grad]

    def prepend(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook body: rewrite the model's inputs (shapes in the module docstring)."""
        if self.disabled:
            return args, kwargs
        names = list(inspect.signature(model.forward).parameters)
        kwargs = {**dict(zip(names, args)), **kwargs}
        p = self.num_virtual_tokens
        past = kwargs.get("past_key_values")
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if past is not None and past.get_seq_length() > 0:
            if mask is not None:
                kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
            if positions is not None:
                kwargs["position_ids"] = positions + p
            return (), kwargs
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if ids is None:
                raise ValueError("prompt tuning needs input_ids or inputs_embeds")
            embeds = model.get_input_embeddings()(ids)
        batch = embeds.shape[0]
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        if kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat([labels.new_full((batch, p), -100), labels], dim=1)
        if positions is not None:
            head = torch.arange(p, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], -1)
            kwargs["position_ids"] = torch.cat([head, positions + p], dim=1)
        return (), kwargs

    def remove(self) -> None:
        """Detach from the model (hook and adapter module)."""
        model = self._model_ref() if self._model_ref is not None else None
        if model is None or self._handle is None:
            raise ValueError("this adapter is not attached to a live model")
        self._handle.remove()
        delattr(model, ADAPTER_ATTR)
        self._handle = self._model_ref = None


def attach_prompt_adapter(
    model: nn.Module, adapter: PromptTuningAdapter, freeze_base: bool = True
) -> PromptTuningAdapter:
    """Install ``adapter`` on a causal LM in place (child ``model.fastpeft_prompt`` + pre-hook)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    if adapter.prompt_embeddings.shape[1] != hidden:
        raise ValueError(
            f"prompt embeddings {tuple(adapter.prompt_embeddings.shape)} do not fit the model's hidden size {hidden}"
        )
    if hasattr(model, ADAPTER_ATTR):
        raise ValueError(f"model already has a {ADAPTER_ATTR!r} adapter; call .remove() on it first")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    adapter.to(model.get_input_embeddings().weight.device)
    adapter.train(model.training)
    model.add_module(ADAPTER_ATTR, adapter)
    adapter._handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: adapter.prepend(module, args, kwargs), with_kwargs=True
    )
    adapter._model_ref = weakref.ref(model)
    config = getattr(model, "config", None)
    adapter.model_shape = (getattr(config, "num_hidden_layers", 0), getattr(config, "num_attention_heads", 0))
    return adapter


def add_prompt_tuning(model: nn.Module, config: PromptTuningConfig, tokenizer: Any = None) -> PromptTuningAdapter:
    """Add prompt tuning to a causal LM in place; returns the adapter (tokenizer only for init='text')."""
    prompt = _initial_prompt(config, model.get_input_embeddings(), tokenizer)
    return attach_prompt_adapter(model, PromptTuningAdapter(prompt))
