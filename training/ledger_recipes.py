"""The memory ledger for the RL and preference recipes: GRPO's sampling and training phases and a DPO
update, for fastpeft and for TRL + PEFT + bitsandbytes, on fake tensors (no GPU needed).

``measure_recipe(RecipeLedgerSpec(...))`` builds the model as :mod:`fastpeft.training.ledger_step`
does (fake CPU tensors, QLoRA) and runs each phase inside its own
:class:`~fastpeft.training.memory_ledger.MemoryTracker`, the frozen weights, the adapters and their
AdamW state counted in each (they stay on the device for the whole run):

- ``sampling`` (GRPO): fastpeft's sampler at its largest (:func:`~fastpeft.training.recipe_steps.grpo_sampling_phase`:
  each prompt's KV once, the G completions' KV at full length, one decode step). TRL without vLLM
  calls ``generate`` on the prompt repeated G times: here a prefill of the G rows into a
  ``DynamicCache``, the cache grown to its final length, and the last decode step.
- ``training``: the reference pass (adapters disabled, no grad) and one update's forward and
  backward over micro-batches, then the AdamW step. fastpeft: the recipes' own functions
  (:mod:`fastpeft.training.recipe_steps`). TRL: its ``add_fused_lm_head`` (TRL 1.16's chunked
  log-prob head, which GRPOTrainer and DPOTrainer install) on the ledger's HF + bnb + PEFT model
  (:mod:`fastpeft.training.ledger_baseline`), called as the trainers call it; off CUDA it scores
  every position instead of only the completion's (CUDA's "compact" path selects rows by value,
  which fake tensors do not have), so its LM-head terms are those of the prompt + completion rows.

The phases run one after another in a real step, so the step's peak is the larger of the two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from fastpeft.training.ledger_step import LedgerSpec, _build_model, fake_step_context, steady_state
from fastpeft.training.memory_ledger import LedgerResult, MemoryTracker
from fastpeft.training.step_design import StepDesign

RECIPES = ("grpo", "dpo")
RECIPE_STACKS = ("fastpeft", "trl")


@dataclasses.dataclass
class RecipeLedgerSpec:
    """One measured recipe step. GRPO: ``num_prompts`` prompts × ``group_size`` completions; DPO:
    ``num_prompts`` pairs (chosen and rejected each ``prompt_len + completion_len`` tokens).
    ``micro_batch_size``: completions (GRPO) or pairs (DPO) per forward, the same for both stacks."""

    model_config: dict[str, Any]
    recipe: Literal["grpo", "dpo"] = "grpo"
    stack: Literal["fastpeft", "trl"] = "fastpeft"
    prompt_len: int = 512
    completion_len: int = 1024
    group_size: int = 8
    num_prompts: int = 1
    micro_batch_size: int = 1
    beta: float | None = None  # None: the recipe's default (GRPO 0.04, DPO 0.1)
    lora_r: int = 16
    lora_alpha: float = 32.0
    dtype: str = "bfloat16"
    design: StepDesign = dataclasses.field(default_factory=StepDesign)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.stack not in RECIPE_STACKS:
            raise ValueError(f"stack must be one of {RECIPE_STACKS}, got {self.stack!r}")
        for name in ("prompt_len", "completion_len", "group_size", "num_prompts", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def ledger_spec(self) -> LedgerSpec:
        return LedgerSpec(
            self.model_config,
            seq_len=self.prompt_len + self.completion_len,
            method="qlora",
            stack="fastpeft" if self.stack == "fastpeft" else "hf_peft",
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            dtype=self.dtype,
            design=self.design,
        )


def measure_recipe(spec: RecipeLedgerSpec) -> dict[str, LedgerResult]:
    """``{"sampling": ..., "training": ...}`` (GRPO) or ``{"training": ...}`` (DPO): each phase's peak."""
    from fastpeft.training.dpo import DPOConfig
    from fastpeft.training.grpo import GRPOConfig

    with fake_step_context():
        model = _build_model(spec.ledger_spec())
        if spec.stack == "trl":
            from trl.trainer.utils import add_fused_lm_head

            outputs = ("log_probs", "entropy") if spec.recipe == "grpo" else ("log_probs",)
            add_fused_lm_head(model.get_base_model(), outputs=outputs)  # as GRPOTrainer / DPOTrainer do
        vocab = model.get_input_embeddings().num_embeddings
        meta = {k: v for k, v in dataclasses.asdict(spec).items() if k != "model_config"}
        results: dict[str, LedgerResult] = {}
        if spec.recipe == "grpo":
            beta = GRPOConfig.beta if spec.beta is None else spec.beta
            results["sampling"] = _tracked(model, lambda phase: _sampling(model, spec), False, meta)
            results["training"] = _tracked(
                model, lambda phase: _grpo_training(model, spec, vocab, beta, phase), True, meta
            )
        else:
            beta = DPOConfig.beta if spec.beta is None else spec.beta
            results["training"] = _tracked(
                model, lambda phase: _dpo_training(model, spec, vocab, beta, phase), True, meta
            )
    return results


def _tracked(
    model: nn.Module, body: Callable[[Callable[[str], None]], Any], train: bool, meta: dict[str, Any]
) -> LedgerResult:
    """Run ``body(set_phase)`` inside a fresh tracker, with the weights, adapters and AdamW state
    resident; with ``train`` the gradients it leaves are applied by an AdamW step."""
    tracker = MemoryTracker()
    with steady_state(tracker, model) as (optimizer, _):
        body(tracker.set_phase)
        if train:
            tracker.set_phase("optimizer")
            optimizer.step()
    notes = [
        "fake CPU tensors under FakeTensorMode: bytes of tensor storage alive at once, not a timing; "
        "allocator rounding and fragmentation and the CUDA context are not included"
    ]
    return tracker.result(notes, **meta)


# ---------------------------------------------------------------------------------------------
# the phases


def _sampling(model: nn.Module, spec: RecipeLedgerSpec) -> None:
    if spec.stack == "fastpeft":
        from fastpeft.training.recipe_steps import grpo_sampling_phase

        grpo_sampling_phase(model, spec.num_prompts, spec.group_size, spec.prompt_len, spec.completion_len)
        return
    from transformers import DynamicCache

    rows, vocab = spec.num_prompts * spec.group_size, model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        ids = torch.randint(0, vocab, (rows, spec.prompt_len))
        model(
            input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        for i, layer in enumerate(cache.layers):  # the generated tokens' KV before the last decode step
            grow = (*layer.keys.shape[:2], spec.completion_len - 1, layer.keys.shape[3])
            cache.update(layer.keys.new_empty(grow), layer.values.new_empty(grow), i)
        total = spec.prompt_len + spec.completion_len
        model(
            input_ids=ids[:, :1],
            attention_mask=torch.ones(rows, total, dtype=ids.dtype),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )


def _grpo_training(
    model: nn.Module, spec: RecipeLedgerSpec, vocab: int, beta: float, set_phase: Callable[[str], None]
) -> None:
    from fastpeft.training.grpo import GRPOConfig
    from fastpeft.training.recipe_steps import grpo_training_phase, synthetic_rollouts

    batch = synthetic_rollouts(vocab, spec.num_prompts, spec.group_size, spec.prompt_len, spec.completion_len)
    if spec.stack == "fastpeft":
        config = GRPOConfig(micro_batch_size=spec.micro_batch_size, beta=beta, num_generations=spec.group_size)
        grpo_training_phase(model, config, batch, set_phase)
        return
    # GRPOTrainer: reference log-probs (adapters disabled, no grad) when beta > 0, then per micro-batch
    # `_get_per_token_logps_and_entropies` and the clipped-ratio loss with the k3 KL term
    ids, mask, c = batch.input_ids, batch.attention_mask, spec.completion_len
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-c] = -100
    adv, n, mb = torch.randn(ids.shape[0]), ids.shape[0], spec.micro_batch_size
    ref = None
    if beta > 0:
        with torch.no_grad(), model.disable_adapter():
            ref = torch.cat(
                [
                    model(
                        input_ids=ids[i : i + mb],
                        attention_mask=mask[i : i + mb],
                        labels=labels[i : i + mb],
                        fused_lm_head=True,
                    ).log_probs[:, -c:]
                    for i in range(0, n, mb)
                ]
            )
    for i in range(0, n, mb):
        set_phase("forward")
        out = model(
            input_ids=ids[i : i + mb], attention_mask=mask[i : i + mb], labels=labels[i : i + mb], fused_lm_head=True
        )
        logp = out.log_probs[:, -c:]
        per_token = -torch.exp(logp - logp.detach()) * adv[i : i + mb, None]
        if ref is not None:
            delta = ref[i : i + mb] - logp
            per_token = per_token + beta * (torch.exp(delta) - delta - 1)
        loss = per_token.sum() / (n * c)
        set_phase("backward")
        loss.backward()
        del out, logp, per_token, loss


def _dpo_training(
    model: nn.Module, spec: RecipeLedgerSpec, vocab: int, beta: float, set_phase: Callable[[str], None]
) -> None:
    from fastpeft.training.dpo import DPOConfig
    from fastpeft.training.recipe_steps import dpo_training_phase, synthetic_pairs

    pairs = synthetic_pairs(vocab, spec.num_prompts, spec.prompt_len, spec.completion_len)
    if spec.stack == "fastpeft":
        dpo_training_phase(
            model, DPOConfig(micro_batch_size=spec.micro_batch_size, beta=beta), pairs, on_phase=set_phase
        )
        return
    # DPOTrainer (precompute_ref_log_probs=False, its default): chosen and rejected concatenated in one
    # forward, the reference the same forward with adapters disabled under no grad, the sigmoid loss
    mb = spec.micro_batch_size
    for i in range(0, len(pairs), mb):
        rows = [r for p in pairs[i : i + mb] for r in (p.chosen, p.rejected)]
        ids = torch.tensor([r.input_ids for r in rows])
        labels = torch.tensor([r.labels for r in rows])
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "fused_lm_head": True}
        set_phase("forward")
        with torch.no_grad(), model.disable_adapter():
            ref = model(**kwargs).log_probs.sum(-1)
        logp = model(**kwargs).log_probs.sum(-1)
        margin = (logp[0::2] - ref[0::2]) - (logp[1::2] - ref[1::2])
        loss = -torch.nn.functional.logsigmoid(beta * margin).sum() / len(pairs)
        set_phase("backward")
        loss.backward()
        del logp, loss
