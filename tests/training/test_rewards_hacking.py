"""A hackable reward (length) is exploited without safeguards and held back with them.

The policy is a bandit over output lengths (a softmax over K padded versions of a correct answer),
but everything else is the real machinery: MultiObjectiveReward, group advantages, the GRPO clipped
loss with the k3 KL to a reference policy, and a HackingDetector (LoRA + scalar head on a tiny
causal LM, trained to tell padded outputs from genuine ones) whose score is subtracted.
"""

import warnings

import pytest
import torch

import fastpeft
from fastpeft.demo.arithmetic import make_arithmetic_dataset
from fastpeft.training.losses_rl import group_advantages, grpo_loss
from fastpeft.training.model_setup import build_model
from fastpeft.training.reward_model import ScalarHeadModel
from fastpeft.training.rewards import MultiObjectiveReward, arithmetic_reward
from fastpeft.training.rewards.hacking import HackingDetector, length_reward
from fastpeft.training.tokenizer import load_char_tokenizer

K = 8  # action k = answer followed by 2k filler words
RECORDS = make_arithmetic_dataset(4, seed=5)


def completion(record: dict, k: int) -> str:
    return f" answer {record['answer']}" + " ok" * (2 * k)


@pytest.fixture  # function scope: conftest pins the CPU tests to the torch reference per test
def detector(tiny_config) -> HackingDetector:
    torch.manual_seed(0)
    lm = build_model(None, tiny_config, seed=0)
    fastpeft.inject(lm, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    det = HackingDetector(ScalarHeadModel(lm), load_char_tokenizer())
    train = make_arithmetic_dataset(12, seed=9)
    genuine = [(r["prompt"], completion(r, 0)) for r in train]
    gamed = [(r["prompt"], completion(r, 1 + i % (K - 1))) for i, r in enumerate(train)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = det.fit(genuine, gamed, steps=30, lr=1e-2)
    assert losses[-1] < losses[0]
    return det


def run_bandit(reward: MultiObjectiveReward, beta: float, steps: int = 40, group: int = 8) -> float:
    """GRPO on the bandit; returns the expected number of filler pairs under the final policy."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.zeros(K, requires_grad=True)
    ref_logits = torch.zeros(K)  # the reference policy: uniform over lengths
    opt = torch.optim.Adam([theta], lr=0.1)
    records = [r for r in RECORDS for _ in range(group)]
    for _ in range(steps):
        actions = torch.multinomial(torch.softmax(theta.detach(), 0), len(records), replacement=True, generator=gen)
        texts = [completion(r, int(a)) for r, a in zip(records, actions)]
        batch = reward([r["prompt"] for r in records], texts, records)
        adv = group_advantages(batch.tensor(), group, "group", batch.valid())
        logp = torch.log_softmax(theta, 0)[actions][:, None]  # one "token" per sequence: [N, 1]
        ref = torch.log_softmax(ref_logits, 0)[actions][:, None]
        loss, _ = grpo_loss(logp, logp.detach(), adv, torch.ones_like(logp), beta=beta, ref_logp=ref if beta else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float((torch.softmax(theta.detach(), 0) * torch.arange(K)).sum())


def test_length_hacking_is_exploited_without_safeguards_and_held_back_with_them(detector):
    r = RECORDS[0]
    assert detector.score(r["prompt"], completion(r, 6)) > detector.score(r["prompt"], completion(r, 0))
    start = (K - 1) / 2  # uniform policy
    naive = MultiObjectiveReward({"correct": arithmetic_reward, "length": length_reward})
    hacked = run_bandit(naive, beta=0.0)
    objectives = {"correct": arithmetic_reward, "length": length_reward}
    guarded_reward = MultiObjectiveReward(
        objectives, {"correct": 1.0, "length": 0.5}, detector=detector, detector_weight=1.0
    )
    guarded = run_bandit(guarded_reward, beta=0.05)
    assert hacked > start + 2.0, hacked  # the policy pads its answers
    assert guarded < start - 1.0, guarded  # the safeguards push padding down instead
