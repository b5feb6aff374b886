"""Batched KV-cache sampler: drives any transformers causal LM forward itself (not ``model.generate``).

Pipeline for ``generate(prompts, params, n)`` with P prompts and ``B = P·n`` rows:

1. Tokenise, left-pad to the longest prompt ``Lp`` (positions ``cumsum(mask) - 1``, as HF does).
2. Prefill the P prompts once (one forward over ``[P, Lp]``) into a static cache.
3. Decode all B rows one token per step (forward over ``[B, 1]``). Row ``p·n + j`` is sample j of
   prompt p. With ``prefix_mode="shared"`` (default) the n rows read their prompt's KV in place
   through a two-segment attention (see :mod:`fastpeft.reasoning.kv_cache`); ``"copy"`` copies the
   prompt KV n times and runs the model's own attention.
4. Rows finish independently at EOS, at a stop string (kept in the text) or at their length budget
   ``min(max_new_tokens, max_seq_len - prompt_len)``; finished rows stop counting tokens and their
   further outputs are ignored. Tokens, logprobs and finish state stay on the device
   (:class:`~fastpeft.reasoning.decoding.RowFinishState`): a step makes no host round trip; every
   ``SYNC_EVERY`` steps the host checks stop strings (found at their first token, as if checked
   every step) and ends the loop once every row is done.

Kernels: each decode step feeds ``M = B`` rows through every linear layer, so with ``B <= 16`` the
fastpeft LoRA / QLoRA modules dispatch to their fused NF4 + LoRA decode kernel automatically;
larger batches use the general kernel; the shared prompt KV goes through the cascade attention
kernel. Nothing here selects kernels.

CUDA graphs: on CUDA, in shared mode, the decode step is captured once per ``generate`` call in a
``torch.cuda.CUDAGraph`` (static input ids / step counter / logits, the static caches) after one
eager warm-up step, then replayed. Copy mode and CPU run eagerly (transformers' mask builder,
used in copy mode, may synchronise with the host, which capture forbids).

Logprobs: see :mod:`fastpeft.reasoning.decoding` (the sampling distribution after temperature and
top-k/top-p; the model's log_softmax for greedy). Seeded calls (``SamplingParams.seed``) draw from
their own ``torch.Generator`` and are reproducible for the same prompts, n and batch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch

import fastpeft
from fastpeft.reasoning.decoding import RowFinishState, StopStringChecker, choose_tokens
from fastpeft.reasoning.kv_cache import (
    SHARED_PREFIX_ATTENTION,
    STATE_KWARG,
    SharedPrefixState,
    attention_implementation,
    make_static_cache,
    repeat_cache_rows,
    zero_padding_slots,
)
from fastpeft.reasoning.types import Completion, SamplingParams

PrefixMode = Literal["shared", "copy"]
SYNC_EVERY = 8  # decode steps between host looks at the finish state (early exit, stop strings)


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


class Sampler:
    """Implements :class:`fastpeft.reasoning.types.Generator` for a transformers causal LM.

    Args:
        model: any transformers ``*ForCausalLM`` (optionally with fastpeft adapters injected).
        tokenizer: anything with ``encode(str) -> list[int]`` and ``decode(list[int]) -> str``;
            needed by :meth:`generate` and by stop strings, not by :meth:`generate_ids`.
        max_seq_len: prompt + generated tokens per row; default the model's max positions.
        prefix_mode: ``"shared"`` (prompt KV read in place by the n samples) or ``"copy"``.
        cuda_graph: capture the decode step in a CUDA graph on CUDA (shared mode).
        eos_token_id: int or list; default from the tokenizer, then the generation config / config.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        max_seq_len: int | None = None,
        prefix_mode: PrefixMode = "shared",
        cuda_graph: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
    ):
        if prefix_mode not in ("shared", "copy"):
            raise ValueError(f"prefix_mode must be 'shared' or 'copy', got {prefix_mode!r}")
        self.model, self.tokenizer, self.prefix_mode, self.cuda_graph = model, tokenizer, prefix_mode, cuda_graph
        config = model.config.get_text_config(decoder=True)
        self.vocab_size = int(config.vocab_size)
        if max_seq_len is None:
            max_seq_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
            if max_seq_len is None:
                raise ValueError("the model config has no max_position_embeddings; pass max_seq_len")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.max_seq_len = int(max_seq_len)
        if eos_token_id is None:
            sources = (tokenizer, getattr(model, "generation_config", None), config)
            eos_token_id = next((e for s in sources if (e := getattr(s, "eos_token_id", None)) is not None), None)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        self.eos_token_ids = frozenset(int(e) for e in eos)
        for source in (tokenizer, config):
            if pad_token_id is None:
                pad_token_id = _first_id(getattr(source, "pad_token_id", None))
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    # ---------------------------------------------------------------- public API
    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        n: int = 1,
        adapters: str | Sequence[str | None] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per prompt: ``result[i][j]`` is sample j of ``prompts[i]``."""
        if self.tokenizer is None:
            raise ValueError("Sampler.generate needs a tokenizer; use generate_ids for token ids")
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a sequence of str, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{i}] must be str, got {type(prompt).__name__}")
            if not prompt:
                raise ValueError(f"prompts[{i}] is an empty string")
        prompt_ids = [list(self.tokenizer.encode(p)) for p in prompts]
        return self.generate_ids(prompt_ids, params, n, adapters)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        n: int = 1,
        adapters: str | Sequence[str | None] | None = None,
        *,
        ignore_eos: bool = False,
    ) -> list[list[Completion]]:
        """Like :meth:`generate` on token ids; ``text`` is empty without a tokenizer.

        ``ignore_eos`` keeps rows going past EOS (for throughput measurements).
        """
        self._check_args(prompt_ids, params, n)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the continuation")
        stop = StopStringChecker(params.stop, self._decode) if params.stop else None
        prefill_ctx, decode_ctx = self._adapter_contexts(adapters, len(prompt_ids), n)
        with _inference(self.model):
            return self._run(prompt_ids, params, n, stop, prefill_ctx, decode_ctx, ignore_eos)

    # ---------------------------------------------------------------- the loop
    def _run(self, prompt_ids, params, n, stop, prefill_ctx, decode_ctx, ignore_eos) -> list[list[Completion]]:
        device = self.model.get_input_embeddings().weight.device
        num_prompts, rows = len(prompt_ids), len(prompt_ids) * n
        lengths = [len(p) for p in prompt_ids]
        width = max(lengths)
        ids = torch.full((num_prompts, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((num_prompts, width), dtype=torch.bool)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = True
        ids, mask = ids.to(device), mask.to(device)
        budgets = [min(params.max_new_tokens, self.max_seq_len - lengths[i // n]) for i in range(rows)]
        gen_len = max(budgets)
        prompt_lengths = torch.tensor(lengths, dtype=torch.long, device=device)

        with prefill_ctx, _contiguous_input(self.model.get_output_embeddings()):
            if self.prefix_mode == "shared":
                cache, prefill_mask = make_static_cache(self.model, width), mask
            else:
                cache = make_static_cache(self.model, width + gen_len)
                prefill_mask = torch.cat([mask, mask.new_ones(num_prompts, gen_len)], dim=1)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            out = self.model(
                input_ids=ids,
                attention_mask=prefill_mask.long(),
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **self._keep_one(),
            )
            logits = out.logits[:, -1, :].repeat_interleave(n, dim=0)  # [B, V]
            zero_padding_slots(cache, mask)

        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        state = RowFinishState(budgets, () if ignore_eos else sorted(self.eos_token_ids), device)
        with contextlib.ExitStack() as stack:
            stack.enter_context(decode_ctx)
            step_fn = None
            for step in range(gen_len):
                chosen, chosen_lp = choose_tokens(logits, params, generator)
                state.record(step, chosen, chosen_lp)
                # the host looks only every SYNC_EVERY steps (and last): rows that finished meanwhile
                # ran a few steps more, their outputs ignored; stop strings are found at their first token
                if step == gen_len - 1 or step % SYNC_EVERY == SYNC_EVERY - 1:
                    if stop is not None:
                        state.check_stops(step + 1, stop)
                    if step == gen_len - 1 or state.all_finished():
                        break
                if step_fn is None:
                    step_fn = self._make_decode_step(stack, cache, mask, prompt_lengths, rows, n, gen_len, device)
                logits = step_fn(chosen)

        completions = []
        for ids_r, logprobs_r, reason in state.results():
            if reason == "stop":
                text = stop.check(ids_r)
            else:
                text = self._decode(ids_r[:-1] if reason == "eos" else ids_r) if self.tokenizer is not None else ""
            completions.append(Completion(text, ids_r, logprobs_r, reason))  # type: ignore[arg-type]
        return [completions[i * n : (i + 1) * n] for i in range(num_prompts)]

    def _make_decode_step(self, stack, cache, mask, prompt_lengths, rows, n, gen_len, device) -> _DecodeStep:
        """Build the decode-step closure over static buffers (and enter the attention switch)."""
        ids_buf = torch.zeros((rows, 1), dtype=torch.long, device=device)
        step_buf = torch.zeros((), dtype=torch.long, device=device)
        row_lengths = prompt_lengths.repeat_interleave(n)  # [B]
        max_pos = self.max_seq_len - 1  # finished rows may run past their budget; keep positions valid
        keep = self._keep_one()
        if self.prefix_mode == "shared":
            acc = torch.promote_types(self.model.get_input_embeddings().weight.dtype, torch.float32)
            state = SharedPrefixState(cache, mask, prompt_lengths, gen_len)
            gen_cache = make_static_cache(self.model, gen_len)
            ones = torch.ones((rows, 1), dtype=torch.long, device=device)  # no mask is built for our attention
            stack.enter_context(attention_implementation(self.model, SHARED_PREFIX_ATTENTION))

            def forward() -> torch.Tensor:
                state.advance(step_buf, acc)
                positions = (row_lengths + step_buf).clamp(max=max_pos)[:, None]
                out = self.model(
                    input_ids=ids_buf,
                    position_ids=positions,
                    attention_mask=ones,
                    past_key_values=gen_cache,
                    use_cache=True,
                    **{STATE_KWARG: state},
                    **keep,
                    **self._cache_position(step_buf),
                )
                step_buf.add_(1)
                return out.logits[:, -1, :]

            def check_routed() -> None:
                # a model whose attention bypasses AttentionInterface would silently ignore the prompt
                if state.calls == 0:
                    raise RuntimeError(
                        f"{type(self.model).__name__}'s attention does not dispatch through "
                        "transformers' AttentionInterface; use Sampler(prefix_mode='copy')"
                    )
        else:
            repeat_cache_rows(cache, n)
            row_mask = torch.cat([mask, mask.new_ones(mask.shape[0], gen_len)], dim=1).repeat_interleave(n, 0).long()

            def forward() -> torch.Tensor:
                positions = (row_lengths + step_buf).clamp(max=max_pos)[:, None]
                out = self.model(
                    input_ids=ids_buf,
                    position_ids=positions,
                    attention_mask=row_mask,
                    past_key_values=cache,
                    use_cache=True,
                    **keep,
                    **self._cache_position(step_buf + mask.shape[1]),
                )
                step_buf.add_(1)
                return out.logits[:, -1, :]

            check_routed = None
        use_graph = self.cuda_graph and device.type == "cuda" and self.prefix_mode == "shared"
        return _DecodeStep(forward, ids_buf, use_graph, check_routed)

    # ---------------------------------------------------------------- helpers
    def _keep_one(self) -> dict[str, int]:
        return {"logits_to_keep": 1} if self._keeps_logits else {}

    def _cache_position(self, slot: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cache slot of this step's token, as a device tensor, for transformers versions whose
        forward takes ``cache_position`` (else they derive it from the cache with a host sync, which a
        CUDA-graph capture forbids); newer ones track it in the cache itself."""
        return {"cache_position": slot.reshape(1)} if self._takes_cache_position else {}

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(list(token_ids))

    def _check_args(self, prompt_ids, params, n) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be int, got {type(n).__name__}")
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        if len(prompt_ids) == 0:
            raise ValueError("prompts is empty")
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} has no tokens")
            if len(p) >= self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; the cache holds max_seq_len={self.max_seq_len} "
                    "tokens per row, including at least one new token"
                )
            bad = [t for t in p if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")

    def _adapter_contexts(self, adapters, num_prompts: int, n: int):
        """(prefill context over P rows, decode context over P·n rows) that route each row's adapter.

        None, or every prompt naming the model's active adapter: the model runs as it is (the
        active adapter's fused kernels). Otherwise ``fastpeft.route_adapters`` routes batch rows.
        """
        if adapters is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        names = [adapters] * num_prompts if isinstance(adapters, str) else list(adapters)
        if len(names) != num_prompts:
            raise ValueError(f"adapters has {len(names)} names for {num_prompts} prompts")
        active = fastpeft.active_adapter(self.model)
        if all(name is None or name == active for name in names):
            return contextlib.nullcontext(), contextlib.nullcontext()
        names = [active if name is None else name for name in names]
        rows = [name for name in names for _ in range(n)]
        return fastpeft.route_adapters(self.model, names), fastpeft.route_adapters(self.model, rows)


class _DecodeStep:
    """One decode forward over static buffers: ``step(tokens [B]) -> logits [B, V]``.

    With ``use_graph``: the first call runs eagerly on a side stream (warm-up: lazy cache allocation,
    Triton compilation, cuBLAS handles, the kernels' workspaces), the second captures ``forward`` in a
    CUDA graph on that same stream, so the workspaces (keyed by stream) are the ones the warm-up made,
    outside the graph's pool, and every call from then on replays it. Capture only records kernels:
    each call's effects (cache write, step counter) happen once, at replay. The returned logits are
    the graph's static output, valid until the next call.
    """

    def __init__(
        self,
        forward: Callable[[], torch.Tensor],
        ids_buf: torch.Tensor,
        use_graph: bool,
        check_routed: Callable[[], None] | None,
    ):
        self.forward, self.ids_buf, self.use_graph, self.check_routed = forward, ids_buf, use_graph, check_routed
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.stream = torch.cuda.Stream(ids_buf.device) if use_graph else None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids_buf.copy_(tokens.view(-1, 1))
        self.calls += 1
        if self.calls == 1:
            logits = self._on_side_stream() if self.use_graph else self.forward()
            if self.check_routed is not None:
                self.check_routed()
            return logits
        if not self.use_graph:
            return self.forward()
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.stream):
                self.logits = self.forward()
        self.graph.replay()
        return self.logits

    def _on_side_stream(self) -> torch.Tensor:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            logits = self.forward()
        torch.cuda.current_stream().wait_stream(self.stream)
        return logits


@contextlib.contextmanager
def _contiguous_input(head: torch.nn.Module | None) -> Iterator[None]:
    """Hand the LM head a contiguous input during the prefill: ``logits_to_keep=1`` gives it the last
    position as a strided ``[P, 1, H]`` view, on which CPU bf16 ``F.linear`` copies the weight once
    per row (0.5 s at P = 8, H = 512, V = 8192, against 1 ms for the same rows made contiguous)."""
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """eval() + inference_mode for the call; every module's own train/eval flag is restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in flags:
            module.training = training
