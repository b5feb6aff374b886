"""The GRPO and DPO steps on synthetic batches (what the memory ledger measures) run the recipes'
own functions: on a real tiny QLoRA model they give finite losses and adapter gradients, and on a
model of fake tensors (shapes only, as under the ledger's FakeTensorMode) they run to the end."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

from fastpeft.training import recipe_steps
from fastpeft.training.dpo import DPOConfig
from fastpeft.training.grpo import GRPOConfig
from fastpeft.training.model_setup import apply_finetune_mode, build_model


@pytest.mark.parametrize("fake", [False, True])
def test_grpo_and_dpo_steps_run_as_the_recipes_do(fake, tiny_llama):
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(None, tiny_llama(max_position_embeddings=256), seed=0)
        apply_finetune_mode(model, "lora" if fake else "qlora", {"r": 4})  # fake NF4 packing is the ledger's
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]

        tokens = recipe_steps.grpo_sampling_phase(model, num_prompts=2, group_size=4, prompt_len=9, new_tokens=5)
        assert tokens.shape == (8,) and all(p.grad is None for p in trainable)

        batch = recipe_steps.synthetic_rollouts(model.config.vocab_size, 2, 4, prompt_len=9, completion_len=5)
        loss = recipe_steps.grpo_training_phase(
            model, GRPOConfig(micro_batch_size=3, beta=0.1, num_iterations=2), batch
        )
        assert all(p.grad is not None for p in trainable)
        model.zero_grad(set_to_none=True)

        pairs = recipe_steps.synthetic_pairs(model.config.vocab_size, 3, prompt_len=4, completion_len=6)
        sums = {}
        for cached in (False, True):
            sums[cached] = recipe_steps.dpo_training_phase(model, DPOConfig(micro_batch_size=2), pairs, cached)
            assert sums[cached].shape == (4,) and all(p.grad is not None for p in trainable)
            model.zero_grad(set_to_none=True)
        if fake:
            assert is_fake(loss) and is_fake(sums[False])
        else:
            assert math.isfinite(float(loss))
            # fresh adapters: the policy is the reference (adapters disabled), so each pair's loss is log 2
            assert float(sums[False][0]) == pytest.approx(3 * math.log(2), rel=1e-5)
