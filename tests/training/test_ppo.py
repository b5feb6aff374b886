"""PPO on a tiny model: steps run, policy and value head update, the value head is saved."""

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fastpeft.demo.arithmetic import make_arithmetic_dataset
from fastpeft.training.model_setup import build_model
from fastpeft.training.ppo import PPOConfig, sequence_rewards_to_tokens, train
from fastpeft.training.rewards import MultiObjectiveReward


def test_sequence_reward_lands_on_the_last_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    out = sequence_rewards_to_tokens(torch.tensor([2.0, -1.0, math.nan]), mask)
    assert out.tolist() == [[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0]]


def test_ppo_steps_update_policy_and_value_head(tmp_path, tiny_config):
    model = build_model(None, tiny_config, seed=0)
    config = PPOConfig(
        model_config=tiny_config,
        train_data=make_arithmetic_dataset(8, seed=6),
        max_steps=2,
        prompts_per_step=2,
        samples_per_prompt=2,
        max_new_tokens=8,
        max_seq_len=64,
        mini_batch_size=2,
        ppo_epochs=2,
        lr=1e-2,
        kl_coef=0.1,
        lora={"r": 4, "lora_alpha": 8},
        output_dir=str(tmp_path / "ppo"),
        progress=False,
        plot=False,
        device="cpu",
    )
    reward = MultiObjectiveReward({"len": lambda p, c, r: len(c) / 8.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config, model=model, reward=reward)
    assert len(result.history) == 2
    for rec in result.history:
        assert math.isfinite(rec["loss"]) and math.isfinite(rec["value_loss"]) and rec["value_loss"] > 0
        assert "kl" in rec and "clip_fraction" in rec
    assert result.history[1]["value_mean"] != 0.0  # the zero-initialised value head learned something
    lora_b = [float(p.detach().abs().max()) for n, p in model.named_parameters() if "lora_B" in n]
    assert max(lora_b) > 0
    head = load_file(str(tmp_path / "ppo" / "adapter" / "value_head.safetensors"))
    assert head["weight"].shape == (1, tiny_config["hidden_size"]) and float(head["weight"].abs().max()) > 0


def test_ppo_config_errors():
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOConfig(mini_batch_size=0)
    with pytest.raises(ValueError, match="kl_coef"):
        PPOConfig(kl_coef=-1.0)
