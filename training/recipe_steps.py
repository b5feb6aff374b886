"""One step of the GRPO and DPO recipes on a synthetic batch of a chosen shape, as the recipes run it.

For memory accounting: fastpeft's memory ledger (fake tensors under ``FakeTensorMode``: shapes, no
values) measures these at model sizes no CPU holds, and the tests run them on real tiny models and
on fake ones. Each phase goes through the recipe's own functions, so what is measured is what trains:

- :func:`grpo_sampling_phase`: the sampler's prefill of P prompts (each prompt's KV computed once)
  and a decode step of the P·G rows over its static caches (prompt KV + the rows' generated KV at
  full length: the KV cache at its largest), then the caches are dropped, as after ``generate``;
- :func:`grpo_training_phase`: the reference pass (adapters disabled, no grad) and one update's
  forward and backward over micro-batches of completions (:func:`fastpeft.training.grpo.policy_update`);
- :func:`dpo_training_phase`: one update over micro-batches of pairs
  (:func:`fastpeft.training.dpo.pair_update`), the reference on the fly or from a cache.

Gradients are left in ``.grad``; the optimizer step (and its state) is the caller's, as in the
ledger's SFT step. Completions and pairs are full length (every token a target): the most a
batch of that shape costs.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import fastpeft
from fastpeft.reasoning.types import SamplingParams
from fastpeft.training.data import Row
from fastpeft.training.dpo import DPOConfig, PairLogprobs, pair_update
from fastpeft.training.grpo import GRPOConfig, policy_update
from fastpeft.training.pairs import PairRow
from fastpeft.training.recipe import RunContext
from fastpeft.training.rollout import CompletionLogprobs, RolloutBatch, batched_logprobs, layout

PhaseHook = Callable[[str], None]  # told "forward" / "backward" as a micro-batch enters each (the ledger's phases)


class LocalRun:
    """The part of a :class:`~fastpeft.training.loop.RecipeRun` the update functions use, for one
    process outside a training loop (no optimizer, no logging)."""

    def __init__(self, module: nn.Module, lm: nn.Module, bf16: bool = False, on_phase: PhaseHook | None = None):
        device = lm.get_input_embeddings().weight.device
        self.runner = module
        self.ctx = RunContext(0, 1, device, False, None, lm, True, Path("."), bf16)
        self.on_phase = on_phase or (lambda phase: None)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        self.on_phase("forward")
        return self.ctx.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.on_phase("backward")
        loss.backward()

    def count_tokens(self, n: int) -> None:
        """No throughput meter outside a training loop: the tokens are not recorded."""


def synthetic_rollouts(
    vocab: int, num_prompts: int, group_size: int, prompt_len: int, completion_len: int, seed: int = 0
) -> RolloutBatch:
    """``num_prompts · group_size`` rows of full-length random prompts and completions (the rollout
    layout). Token ids are drawn on the host (Python's RNG), so this also works under FakeTensorMode."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(num_prompts)]
    rows = [p for p in prompts for _ in range(group_size)]
    completions = [[rng.randrange(vocab) for _ in range(completion_len)] for _ in rows]
    ids, mask, positions, comp_mask, lp = layout(rows, completions, pad_id=0)
    n = len(rows)
    return RolloutBatch(
        [""] * n, [{}] * n, [""] * n, ids, mask, positions, comp_mask, torch.zeros(n, dtype=torch.bool), lp, group_size
    )


def grpo_sampling_phase(
    model: nn.Module, num_prompts: int, group_size: int, prompt_len: int, new_tokens: int
) -> torch.Tensor:
    """The sampler's memory at its largest: prefill ``[P, prompt_len]`` into the prompt cache, then
    one decode step of the ``P · group_size`` rows with the generated-token cache allocated for
    ``new_tokens`` (shared-prefix mode, the sampler's default). Returns the chosen tokens ``[P·G]``."""
    from fastpeft.reasoning.decoding import choose_tokens
    from fastpeft.reasoning.kv_cache import make_static_cache, zero_padding_slots
    from fastpeft.reasoning.sampler import Sampler, _inference

    sampler = Sampler(model, max_seq_len=prompt_len + new_tokens, cuda_graph=False)
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (num_prompts, prompt_len), device=device)
    mask = torch.ones((num_prompts, prompt_len), dtype=torch.bool, device=device)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    with _inference(model), contextlib.ExitStack() as stack:
        cache = make_static_cache(model, prompt_len)
        positions = torch.arange(prompt_len, device=device).expand(num_prompts, -1)
        out = model(
            input_ids=ids,
            attention_mask=mask.long(),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **sampler._keep_one(),
        )
        logits = out.logits[:, -1, :].repeat_interleave(group_size, dim=0)  # [B, V]
        zero_padding_slots(cache, mask)
        del out
        tokens, _ = choose_tokens(logits, params, None)
        lengths = torch.full((num_prompts,), prompt_len, dtype=torch.long, device=device)
        step = sampler._make_decode_step(
            stack, cache, mask, lengths, num_prompts * group_size, group_size, new_tokens, device
        )
        tokens, _ = choose_tokens(step(tokens), params, None)
    return tokens


def grpo_training_phase(
    model: nn.Module, config: GRPOConfig, batch: RolloutBatch, on_phase: PhaseHook | None = None
) -> torch.Tensor:
    """The reference pass (when ``config.beta > 0``) and one update's forward and backward on
    ``batch`` (advantages and mask of a full batch), as :func:`fastpeft.training.grpo.train` runs
    them between sampling and the optimizer step; ``on_phase`` hears "forward" / "backward" as each
    micro-batch enters them. Returns this process's loss (0-d tensor)."""
    module = CompletionLogprobs(model, batch.prompt_width, config.temperature)
    run = LocalRun(module, model, config.bf16, on_phase)
    adv = torch.randn(batch.num_sequences)
    mask = batch.completion_mask
    ref_logp = old_logp = None
    with run.ctx.autocast():
        if config.beta > 0:
            with fastpeft.disable_adapters(model):
                ref_logp = batched_logprobs(module, batch, config.micro_batch_size)["logp"]
        if config.num_iterations > 1:
            old_logp = batched_logprobs(module, batch, config.micro_batch_size)["logp"]
    norms = (float(batch.num_sequences), float(batch.num_sequences * mask.shape[1]))
    loss, _ = policy_update(run, config, batch, adv, mask, old_logp, ref_logp, norms)
    return loss


def synthetic_pairs(vocab: int, num_pairs: int, prompt_len: int, completion_len: int, seed: int = 0) -> list[PairRow]:
    """Preference pairs of random tokens (drawn on the host): a shared prompt (not a target), two
    completions of ``completion_len``."""
    rng = random.Random(seed)

    def row(prompt: list[int]) -> Row:
        completion = [rng.randrange(vocab) for _ in range(completion_len)]
        ids = prompt + completion
        return Row(ids, [-100] * len(prompt) + completion, list(range(len(ids))), [1] * len(ids))

    pairs = []
    for i in range(num_pairs):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        pairs.append(PairRow(i, row(prompt), row(prompt)))
    return pairs


def dpo_training_phase(
    model: nn.Module,
    config: DPOConfig,
    pairs: list[PairRow],
    cached_reference: bool = False,
    pad_id: int = 0,
    on_phase: PhaseHook | None = None,
) -> torch.Tensor:
    """One DPO update's forward and backward over ``pairs`` in micro-batches of
    ``config.micro_batch_size`` pairs, the reference on the fly (adapters disabled) or, with
    ``cached_reference``, from a precomputed cache (``on_phase``: as for
    :func:`grpo_training_phase`). Returns the sums of :func:`~fastpeft.training.dpo.pair_update`."""
    module = PairLogprobs(model, average=config.loss_type == "ipo")
    run = LocalRun(module, model, config.bf16, on_phase)
    cache = {p.index: (0.0, 0.0) for p in pairs} if cached_reference else None
    mb = config.micro_batch_size
    micro = [pairs[i : i + mb] for i in range(0, len(pairs), mb)]
    return pair_update(run, config, module, micro, pad_id, cache, float(len(pairs)))
