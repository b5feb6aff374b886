"""Sampling from the policy adapter while a verifier adapter scores every token, in one forward.

Step-level search alternates "extend the beams" (the policy decodes a step) with "score the new
prefixes" (the verifier re-reads prompt + prefix in a separate pass). When the verifier is an
adapter plus a scalar head on the policy's own base, both can share each decode step instead:
the batch holds the R policy rows and R verifier rows fed the same tokens, routed per row by
:func:`fastpeft.route_adapters`, so the base weights are read once per step for both and the
verifier's score of every prefix falls out of the decode (``head(h_t)`` at the row's last token),
with no re-reading of prompt and prefix. One model is in memory.

:class:`ScoredSampler` is a :class:`~fastpeft.reasoning.types.Generator` *and* a
:class:`~fastpeft.reasoning.types.Scorer`: ``generate`` remembers the verifier's score of each
completion's text (``prompt + text``), ``score`` returns it (a miss goes to ``fallback``, a
separate-pass scorer, and is counted). A step-level strategy handed the same object as generator
and scorer therefore never runs a scoring pass for the prefixes it generated.

Rows finish at EOS (the score is the one of the text before it), at a stop string or at their
length budget (one more step reads the last token). Decoding is plain KV-cache decoding (HF
``DynamicCache``), left-padded prompts, on whatever device the model is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import fastpeft
from fastpeft.reasoning.decoding import StopStringChecker, choose_tokens
from fastpeft.reasoning.types import Completion, SamplingParams, Scorer


class ScoredSampler:
    """Policy adapter ``policy`` samples, verifier adapter ``verifier`` + ``head`` scores (module docstring).

    ``head``: ``[M, H] -> [M, 1]`` logits (e.g. a reward model's scalar head); scores are σ(logit).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        head: nn.Module,
        verifier: str,
        policy: str | None = None,
        max_seq_len: int | None = None,
        fallback: Scorer | None = None,
    ):
        if verifier not in fastpeft.list_adapters(model):
            raise ValueError(f"no adapter named {verifier!r} in the model (adapters: {fastpeft.list_adapters(model)})")
        self.model, self.tokenizer, self.head, self.verifier = model, tokenizer, head, verifier
        self.policy = policy or fastpeft.active_adapter(model)
        config = model.config.get_text_config(decoder=True)
        self.max_seq_len = int(max_seq_len or config.max_position_embeddings)
        self.eos = int(tokenizer.eos_token_id)
        self.fallback = fallback
        self.scores: dict[str, float] = {}
        self.misses = 0

    # ------------------------------------------------------------------ Scorer
    def score(self, prompt: str, response: str) -> float:
        key = prompt + response
        if key in self.scores:
            return self.scores[key]
        if self.fallback is None:
            raise KeyError(f"no verifier score for a text this sampler did not generate ({len(key)} characters)")
        self.misses += 1
        return float(self.fallback.score(prompt, response))

    # ------------------------------------------------------------------ Generator
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        n: int = 1,
        adapters: str | Sequence[str | None] | None = None,
    ) -> list[list[Completion]]:
        names = {adapters} if isinstance(adapters, str) or adapters is None else set(adapters)
        if names - {None, self.policy}:
            raise ValueError(f"ScoredSampler samples from its policy adapter {self.policy!r} only, got {adapters!r}")
        ids = [list(self.tokenizer.encode(p)) for p in prompts]
        if not ids or n < 1 or any(not x or len(x) >= self.max_seq_len - 1 for x in ids):
            raise ValueError(f"need prompts of 1..{self.max_seq_len - 2} tokens and n >= 1")
        was = self.model.training
        self.model.eval()
        try:
            rows = self._decode(ids, params, n)
        finally:
            self.model.train(was)
        stop = StopStringChecker(params.stop, self._decode_text) if params.stop else None
        out = []
        for r, (tokens, logprobs, reason, score) in enumerate(rows):
            if reason == "stop":
                text = stop.check(tokens)
            else:
                text = self._decode_text(tokens[:-1] if reason == "eos" else tokens)
            self.scores[prompts[r // n] + text] = score
            out.append(Completion(text, tokens, logprobs, reason))
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, routes: list[str]
    ) -> torch.Tensor:
        with fastpeft.route_adapters(self.model, routes):
            out = self.model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
        return out[0][:, -1]  # [rows, H]

    def _decode(self, prompt_ids: list[list[int]], params: SamplingParams, n: int) -> list[tuple]:
        from transformers import DynamicCache

        device = self.model.get_input_embeddings().weight.device
        p, width = len(prompt_ids), max(len(x) for x in prompt_ids)
        rows = p * n
        ids = torch.full((2 * p, width), int(self.tokenizer.pad_token_id or 0), dtype=torch.long)
        mask = torch.zeros((2 * p, width), dtype=torch.long)
        for i, x in enumerate(prompt_ids + prompt_ids):  # the policy's P rows, then the verifier's
            ids[i, width - len(x) :], mask[i, width - len(x) :] = torch.tensor(x), 1
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache()
        hidden = self._forward(
            ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, [self.policy] * p + [self.verifier] * p
        )
        cache.batch_repeat_interleave(n)  # [2P] -> [2P·n]: each prompt's n rows, policy half then verifier half
        hidden, mask = hidden.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        lengths = torch.tensor([len(x) for x in prompt_ids], device=device).repeat_interleave(n).repeat(2)
        routes = [self.policy] * rows + [self.verifier] * rows
        lm_head = self.model.get_output_embeddings()
        budgets = [min(params.max_new_tokens, self.max_seq_len - len(prompt_ids[r // n]) - 1) for r in range(rows)]
        generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        stop = StopStringChecker(params.stop, self._decode_text) if params.stop else None
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        reasons: list[str | None] = [None] * rows
        pending = [False] * rows  # finished, waiting for the verifier to read its last token
        final: list[float | None] = [None] * rows
        last = torch.sigmoid(self.head(hidden[rows:].float()).squeeze(-1)).tolist()  # the bare prompts' values
        step = 0
        while True:
            chosen, chosen_lp = choose_tokens(lm_head(hidden[:rows]).float(), params, generator)
            for r, (tok, lp) in enumerate(zip(chosen.tolist(), chosen_lp.tolist())):
                if reasons[r] is not None:
                    continue
                tokens[r].append(tok)
                logprobs[r].append(lp)
                if tok == self.eos:
                    reasons[r], final[r] = "eos", last[r]
                elif stop is not None and stop.check(tokens[r]) is not None:
                    reasons[r], pending[r] = "stop", True
                elif len(tokens[r]) >= budgets[r]:
                    reasons[r], pending[r] = "length", True
            if all(reason is not None for reason in reasons) and not any(pending):
                break
            feed = chosen.repeat(2)[:, None]
            mask = torch.cat([mask, mask.new_ones(2 * rows, 1)], dim=1)
            hidden = self._forward(feed, mask, (lengths + step)[:, None], cache, routes)
            last = torch.sigmoid(self.head(hidden[rows:].float()).squeeze(-1)).tolist()
            for r in range(rows):
                if pending[r]:
                    final[r], pending[r] = last[r], False
            step += 1
        return list(zip(tokens, logprobs, reasons, final))
