"""Static KV caches for the sampler, and the two-segment attention that shares a prompt's KV.

Two layouts (``prefix_mode`` of :class:`fastpeft.reasoning.sampler.Sampler`):

* ``"shared"``: the P prompts are prefilled once into a prompt cache ``[P, Hkv, Lp, D]``; the
  ``B = P·n`` decode rows write only their own generated tokens into a second static cache
  ``[B, Hkv, G, D]``. During decode the model's attention is switched to
  :func:`shared_prefix_attention`: every row's query against its prompt's KV *in place* (the n rows
  of a prompt, with their g heads per KV head, are one group of query rows for the cascade kernel,
  :mod:`fastpeft.kernels.cascade_attention`, which reads the prompt KV once per group), then against
  the row's own generated KV, the two merged exactly through their log-sum-exp.
* ``"copy"``: the prompts are still prefilled once, then each prompt's KV is copied n times into a
  ``[B, Hkv, Lp + G, D]`` static cache and the model's own attention runs unchanged. Works for any
  attention transformers implements (softcapping, sinks, ...), at n copies of the prompt KV.

Both caches are transformers ``Cache`` objects made of ``StaticLayer`` (what ``StaticCache`` is
built from): full-length layers even for sliding-window models, so a prompt's KV is never evicted;
the window is applied by the mask instead (by transformers in copy mode, here in shared mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, StaticCache, StaticLayer

from fastpeft.kernels.cascade_attention import cascade_prefix_attention, merge_attention_states

SHARED_PREFIX_ATTENTION = "fastpeft_shared_prefix"
STATE_KWARG = "fastpeft_shared_prefix_state"
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def _text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def make_static_cache(model: torch.nn.Module, max_cache_len: int) -> Cache:
    """A static cache of ``max_cache_len`` slots per layer; the batch size is fixed by the first update.

    ``StaticCache`` itself when every layer is full attention; otherwise a ``Cache`` of full-length
    ``StaticLayer`` (``StaticCache`` would give sliding layers a rolling window buffer, which would
    evict prompt tokens that the shared-prefix attention indexes by slot).
    """
    config = _text_config(model)
    num_layers = config.num_hidden_layers
    if getattr(config, "attention_chunk_size", None) is not None:
        raise ValueError("chunked attention (config.attention_chunk_size) is not supported by the sampler")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        layer_types = ["sliding_attention" if sliding else "full_attention"] * num_layers
    unsupported = sorted(set(layer_types) - set(_SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise ValueError(f"the sampler supports layer types {_SUPPORTED_LAYER_TYPES}, this model has {unsupported}")
    if all(t == "full_attention" for t in layer_types):
        return StaticCache(config=config, max_cache_len=max_cache_len)
    return Cache(layers=[StaticLayer(max_cache_len=max_cache_len) for _ in range(num_layers)])


def zero_padding_slots(cache: Cache, slot_mask: torch.Tensor) -> None:
    """Zero K/V in slots where ``slot_mask`` ``[batch, slots]`` is False (left padding).

    Padded slots are masked out of every softmax, but a fully-masked padded query row can leave
    NaN in them and ``0 · NaN`` would still poison ``weights @ V``.
    """
    drop = ~slot_mask.to(torch.bool)[:, None, :, None]  # [batch, 1, slots, 1]
    for layer in cache.layers:
        layer.keys[:, :, : drop.shape[2]].masked_fill_(drop, 0)
        layer.values[:, :, : drop.shape[2]].masked_fill_(drop, 0)


def repeat_cache_rows(cache: Cache, n: int) -> None:
    """Copy mode: repeat every row of a prefilled static cache n times in place (row p -> rows p·n .. p·n+n-1)."""
    for layer in cache.layers:
        layer.keys = layer.keys.repeat_interleave(n, dim=0)
        layer.values = layer.values.repeat_interleave(n, dim=0)
        layer.batch_size = layer.keys.shape[0]


@dataclasses.dataclass
class SharedPrefixState:
    """What :func:`shared_prefix_attention` reads besides its arguments; passed as a forward kwarg.

    prompt_cache: the prefilled prompt cache, ``layers[i].keys`` ``[P, Hkv, Lp, D]``.
    key_positions: ``[P, Lp + G]`` position id of every prompt slot then every generated slot.
    base_bias: ``[P, Lp + G]`` 0 where a slot may be attended this step, -inf otherwise
        (padding, and generated slots not written yet); rebuilt by :meth:`advance` each step.
    query_positions: ``[P, 1]`` position of this step's query (the same for the n rows of a prompt).
    calls: attention calls seen, to detect models whose attention bypasses AttentionInterface.
    """

    prompt_cache: Cache
    prompt_mask: torch.Tensor  # [P, Lp] bool
    prompt_lengths: torch.Tensor  # [P] long
    num_generated_slots: int
    base_bias: torch.Tensor | None = None
    key_positions: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    calls: int = 0

    def __post_init__(self) -> None:
        gen_slots = torch.arange(self.num_generated_slots, device=self.prompt_mask.device)
        self._gen_slots = gen_slots
        prompt_pos = self.prompt_mask.long().cumsum(-1) - 1  # -1 on padding, which is masked anyway
        self.key_positions = torch.cat([prompt_pos, self.prompt_lengths[:, None] + gen_slots], dim=1)

    def advance(self, step: torch.Tensor, acc_dtype: torch.dtype) -> None:
        """Build this step's bias from ``step`` (a 0-d long tensor on the device; no host sync, so the
        decode step can be captured in a CUDA graph): generated slots ``0..step`` are visible."""
        num_prompts = self.prompt_mask.shape[0]
        visible = torch.cat([self.prompt_mask, (self._gen_slots <= step).expand(num_prompts, -1)], dim=1)
        zero = torch.zeros((), dtype=acc_dtype, device=visible.device)
        self.base_bias = torch.where(visible, zero, torch.full_like(zero, float("-inf")))
        self.query_positions = self.prompt_lengths[:, None] + step


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Decode attention over [prompt KV shared by n rows | the row's own generated KV].

    query ``[B, Hq, 1, D]`` with ``B = P·n`` (row ``p·n + j`` is sample j of prompt p); key/value
    ``[B, Hkv, G, D]`` (the generated-token static cache, this step's token already written).
    Returns ``([B, 1, Hq, D], None)`` like transformers' attention functions. ``attention_mask`` is
    ignored: visibility comes from the :class:`SharedPrefixState` kwarg.
    """
    state: SharedPrefixState | None = kwargs.get(STATE_KWARG)
    if state is None:
        raise RuntimeError(f"attention '{SHARED_PREFIX_ATTENTION}' called without the {STATE_KWARG} kwarg")
    if softcap is not None or s_aux is not None:
        raise ValueError(
            "shared-prefix attention does not support logit softcapping or attention sinks; "
            "use Sampler(prefix_mode='copy')"
        )
    if dropout:
        raise ValueError(f"shared-prefix attention is for inference; got dropout={dropout}")
    state.calls += 1
    layer = state.prompt_cache.layers[module.layer_idx]
    prompt_k, prompt_v = layer.keys, layer.values  # [P, Hkv, Lp, D]
    b, hq, q_len, d = query.shape
    p, hkv, lp, _ = prompt_k.shape
    if q_len != 1 or b % p or hq % hkv:
        raise ValueError(
            f"shared-prefix attention expects query [P*n, Hq, 1, D] with Hq % Hkv == 0; got query "
            f"{tuple(query.shape)} for prompt keys {tuple(prompt_k.shape)}"
        )
    n, g = b // p, hq // hkv
    scaling = d**-0.5 if scaling is None else scaling
    acc = state.base_bias.dtype

    bias = state.base_bias  # [P, Lp+G]
    if sliding_window is not None:
        # transformers' window: key visible iff query_pos - key_pos < sliding_window
        too_far = state.query_positions - state.key_positions >= sliding_window
        bias = bias.masked_fill(too_far, float("-inf"))

    # Prompt part (kernels/cascade_attention.py): the n rows and the g query heads of a KV head are
    # one group of n·g query rows, for which the prompt's keys and values are read once.
    q_prompt = query.reshape(p, n, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(p, hkv, n * g, d)
    o_prompt, lse_prompt = cascade_prefix_attention(q_prompt, prompt_k, prompt_v, bias[:, :lp], scaling)
    o_prompt = o_prompt.view(p, hkv, n, g, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, g, d)
    lse_prompt = lse_prompt.view(p, hkv, n, g).permute(0, 2, 1, 3).reshape(b, hkv, g)
    # Own part: each row's generated keys [B, Hkv, G, D] (the step's own token is always visible)
    s_gen = torch.matmul(query.reshape(b, hkv, g, d), key.transpose(-1, -2)).to(acc) * scaling  # [B, Hkv, g, G]
    s_gen = s_gen + bias[:, lp:].repeat_interleave(n, dim=0)[:, None, None, :]
    lse_gen = torch.logsumexp(s_gen, dim=-1)
    weights = torch.exp(s_gen - lse_gen[..., None]).to(value.dtype)
    o_gen = torch.matmul(weights, value)  # [B, Hkv, g, D]
    out, _ = merge_attention_states(o_prompt.to(acc), lse_prompt.to(acc), o_gen.to(acc), lse_gen)
    return out.to(query.dtype).reshape(b, 1, hq, d), None


def _register() -> None:
    # AttentionInterface is transformers' public registry for custom attention functions;
    # registering the same function again is a no-op in effect.
    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Temporarily switch the model's attention implementation (restored on exit)."""
    if name == SHARED_PREFIX_ATTENTION:
        _register()
    original = _text_config(model)._attn_implementation
    model.set_attn_implementation(name)
    if _text_config(model)._attn_implementation != name:
        model.set_attn_implementation(original)
        raise ValueError(
            f"{type(model).__name__} cannot switch its attention implementation to {name!r}; "
            "use Sampler(prefix_mode='copy')"
        )
    try:
        yield
    finally:
        model.set_attn_implementation(original)
