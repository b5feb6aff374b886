"""GRPO / PPO losses against numpy computations written out in the test."""

import math

import numpy as np
import pytest
import torch

from fastpeft.training.losses_rl import (
    aggregate_token_loss,
    clipped_policy_loss,
    gae,
    group_advantages,
    grpo_loss,
    k3_kl,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 3.0])  # 3 groups of 4
EPS = 1e-4


def _t(x, dtype=torch.float32):
    return torch.tensor(np.asarray(x), dtype=dtype)


def test_group_advantages_group_scale():
    g = REWARDS.reshape(3, 4)
    expected = (g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + EPS)  # numpy std is ddof=0
    got = group_advantages(_t(REWARDS), 4, "group")
    assert np.allclose(got.numpy(), expected.reshape(-1), atol=1e-5)
    assert np.allclose(got.numpy()[4:8], 0.0)  # all-equal group -> exactly zero, not NaN
    # first group by hand: mean 0.5, std 0.5 -> advantages ±0.5/0.5001
    assert float(got[0]) == pytest.approx(0.5 / 0.5001, rel=1e-6)


def test_group_advantages_batch_and_none():
    g = REWARDS.reshape(3, 4)
    centered = g - g.mean(1, keepdims=True)
    batch = group_advantages(_t(REWARDS), 4, "batch")
    assert np.allclose(batch.numpy(), (centered / (REWARDS.std() + EPS)).reshape(-1), atol=1e-5)
    none = group_advantages(_t(REWARDS), 4, "none")
    assert np.allclose(none.numpy(), centered.reshape(-1), atol=1e-6)


def test_all_equal_rewards_never_nan():
    for scale in ("group", "batch", "none"):
        adv = group_advantages(torch.full((8,), 3.0), 4, scale)
        assert torch.equal(adv, torch.zeros(8)), scale
    single = group_advantages(torch.tensor([1.0, 2.0]), 1, "group")  # groups of one
    assert torch.equal(single, torch.zeros(2))


def test_invalid_samples_are_left_out_of_group_statistics():
    rewards = _t([1.0, math.nan, 0.0, 5.0])
    valid = torch.tensor([True, False, True, False])
    adv = group_advantages(rewards, 4, "group", valid)
    # valid rewards {1, 0}: mean 0.5, std 0.5
    assert np.allclose(adv.numpy(), [0.5 / 0.5001, 0.0, -0.5 / 0.5001, 0.0], atol=1e-6)
    assert not torch.isnan(adv).any()


def test_k3_kl_by_hand():
    logp, ref = np.array([-1.0, -2.0, -0.5]), np.array([-1.0, -1.0, -2.0])
    d = ref - logp
    assert np.allclose(k3_kl(_t(logp), _t(ref)).numpy(), np.exp(d) - d - 1, atol=1e-6)
    assert float(k3_kl(_t([-0.3]), _t([-0.3]))) == 0.0
    assert (k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()


def test_clipped_policy_loss_by_hand():
    logp = np.array([[0.0, np.log(1.5)], [np.log(0.5), np.log(1.1)]])
    old = np.zeros((2, 2))
    adv = np.array([1.0, -2.0])
    ratio = np.exp(logp - old)
    clipped = np.clip(ratio, 0.8, 1.3)
    expected = -np.minimum(ratio * adv[:, None], clipped * adv[:, None])
    loss, was_clipped = clipped_policy_loss(_t(logp), _t(old), _t(adv), eps_low=0.2, eps_high=0.3)
    assert np.allclose(loss.numpy(), expected, atol=1e-6)
    # 1.5 > 1.3 with A > 0 and 0.5 < 0.8 with A < 0 are the clipped ones
    assert was_clipped.tolist() == [[False, True], [True, False]]


def test_aggregations_by_hand():
    per_token = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [5.0, 6.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32)  # third row masked out
    lt, mt = _t(per_token), _t(mask)
    # grpo: per-sequence means (2, 4) over the 2 sequences with tokens
    assert float(aggregate_token_loss(lt, mt, "grpo")) == pytest.approx((2.0 + 4.0) / 2)
    # dr_grpo: sum 10 / (2 sequences * max_len 8)
    assert float(aggregate_token_loss(lt, mt, "dr_grpo", max_len=8)) == pytest.approx(10 / 16)
    # dapo: sum 10 / 4 tokens
    assert float(aggregate_token_loss(lt, mt, "dapo")) == pytest.approx(10 / 4)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_with_global_normalisers_add_up(mode):
    gen = torch.Generator().manual_seed(0)
    per_token = torch.rand(6, 5, generator=gen)
    mask = (torch.rand(6, 5, generator=gen) > 0.3).float()
    mask[2] = 0
    full = aggregate_token_loss(per_token, mask, mode, max_len=7)
    n_seq, n_tok = float((mask.sum(1) > 0).sum()), float(mask.sum())
    parts = sum(aggregate_token_loss(per_token[i : i + 2], mask[i : i + 2], mode, 7, n_seq, n_tok) for i in (0, 2, 4))
    assert float(parts) == pytest.approx(float(full), rel=1e-6)


def test_grpo_loss_gradient_and_kl_term():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.ones(1, 2)
    loss, stats = grpo_loss(logp, logp.detach(), torch.tensor([2.0]), mask, beta=0.1, ref_logp=ref, aggregation="dapo")
    # ratio = 1: pg = -A per token; k3 = (0.5 - log 0.5 - 1, 0) for the two tokens
    k3 = np.array([0.5 - np.log(0.5) - 1, 0.0])
    assert float(loss.detach()) == pytest.approx(-2.0 + 0.1 * k3.mean(), rel=1e-6)
    assert stats["kl"] == pytest.approx(k3.mean(), rel=1e-5) and stats["clip_fraction"] == 0.0
    loss.backward()
    # d/dlogp of -A·exp(logp - old) at ratio 1 is -A, of β·k3 is β(1 - exp(ref - logp)); mean over 2 tokens
    expected = (-2.0 + 0.1 * (1 - np.exp(np.log([0.25, 0.25]) - np.log([0.5, 0.25])))) / 2
    assert np.allclose(logp.grad.numpy()[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp.detach(), torch.tensor([1.0]), mask, beta=0.1)


def test_gae_by_hand():
    rewards = np.array([[0.0, 0.0, 1.0, 0.0], [0.5, -1.0, 0.0, 0.0]])
    values = np.array([[0.2, 0.4, 0.6, 9.0], [0.1, 0.3, 7.0, 7.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.float64)
    gamma, lam = 0.9, 0.8
    expected = np.zeros_like(rewards)
    for b in range(2):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            expected[b, t] = running
    adv, ret = gae(_t(rewards, torch.float64), _t(values, torch.float64), _t(mask, torch.float64), gamma, lam)
    assert np.allclose(adv.numpy(), expected, atol=1e-12)
    assert np.allclose(ret.numpy(), (expected + values) * mask, atol=1e-12)
    # row 0 last step by hand: delta = 1 - 0.6 = 0.4
    assert float(adv[0, 2]) == pytest.approx(0.4)


def test_whiten_and_ppo_losses_by_hand():
    x = _t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = _t([[1, 1, 1], [1, 0, 0]])
    vals = np.array([1.0, 2.0, 3.0, 4.0])
    w = masked_whiten(x, mask)
    assert np.allclose(w.numpy()[mask.numpy() > 0], (vals - vals.mean()) / (vals.std() + 1e-8), atol=1e-6)
    assert float(w[1, 1]) == 0.0

    v, old, ret = _t([[0.5, 1.0]]), _t([[0.0, 0.9]]), _t([[1.0, 0.0]])
    m = torch.ones(1, 2)
    # token 0: unclipped (0.5-1)^2 = .25, clipped V = 0.2 -> (0.2-1)^2 = .64 ; token 1: (1-0)^2 = 1, clipped 1.0 -> 1
    assert float(ppo_value_loss(v, old, ret, m, clip_range=0.2)) == pytest.approx(0.5 * (0.64 + 1.0) / 2)
    assert float(ppo_value_loss(v, old, ret, m, clip_range=None)) == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    logp, old_lp = torch.log(_t([[1.5, 1.0]])), torch.zeros(1, 2)
    loss, frac = ppo_policy_loss(logp, old_lp, _t([[1.0, -1.0]]), m, clip_eps=0.2)
    assert float(loss) == pytest.approx((-1.2 + 1.0) / 2) and frac == pytest.approx(0.5)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.randn(4), 4, "rank")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_token_loss(torch.randn(2, 3), torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match="shapes"):
        k3_kl(torch.randn(2, 3), torch.randn(3, 2))


# ------------------------------------------------------------------- TRL's conventions as options
def test_sample_std_option_by_hand_and_against_trl():
    got = group_advantages(_t(REWARDS), 4, "group", std_correction=1)
    # group 0 = [1, 0, 0, 1]: mean 0.5, sample std sqrt(4 · 0.25 / 3) = 0.57735
    assert float(got[0]) == pytest.approx(0.5 / (math.sqrt(1 / 3) + EPS), rel=1e-6)
    g = REWARDS.reshape(3, 4)
    expected = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + EPS)
    assert np.allclose(got.numpy(), expected.reshape(-1), atol=1e-5)
    batch = group_advantages(_t(REWARDS), 4, "batch", std_correction=1)
    assert np.allclose(
        batch.numpy(), ((g - g.mean(1, keepdims=True)) / (REWARDS.std(ddof=1) + EPS)).reshape(-1), atol=1e-5
    )
    # a group with one valid reward: no sample std, advantage 0 (never NaN)
    lone = group_advantages(_t([1.0, math.nan]), 2, "group", torch.tensor([True, False]), std_correction=1)
    assert torch.equal(lone, torch.zeros(2))
    trl_utils = pytest.importorskip("trl.trainer.utils")
    trl_std = trl_utils.nanstd(_t(REWARDS).view(3, 4), dim=1).repeat_interleave(4)
    rewards = _t(REWARDS)
    trl_adv = (rewards - rewards.view(3, 4).mean(1).repeat_interleave(4)) / (trl_std + EPS)
    assert np.allclose(got.numpy(), trl_adv.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="std_correction"):
        group_advantages(_t(REWARDS), 4, std_correction=2)


def test_count_empty_rows_option_by_hand():
    per_token = _t([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [5.0, 6.0, 0.0, 0.0]])
    mask = _t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # the third row is fully masked
    # grpo: per-sequence means (2, 4, 0) over all 3 rows (TRL's .mean())
    assert float(aggregate_token_loss(per_token, mask, "grpo", count_empty_rows=True)) == pytest.approx(6.0 / 3)
    # dr_grpo: sum 10 / (3 rows * max_len 8)
    assert float(aggregate_token_loss(per_token, mask, "dr_grpo", 8, count_empty_rows=True)) == pytest.approx(10 / 24)
    # dapo counts tokens, not rows: unchanged
    assert float(aggregate_token_loss(per_token, mask, "dapo", count_empty_rows=True)) == pytest.approx(10 / 4)
    loss, _ = grpo_loss(torch.zeros(3, 4), torch.zeros(3, 4), _t([1.0, 1.0, 1.0]), mask, count_empty_rows=True)
    assert float(loss) == pytest.approx(-2.0 / 3)  # -A = -1 on the two rows with tokens, over 3 rows


def test_kl_ratio_correction_by_hand():
    logp = torch.log(_t([[0.5, 0.2]])).requires_grad_()
    old = torch.log(_t([[0.25, 0.2]]))  # ratios 2 and 1
    ref = torch.log(_t([[0.25, 0.4]]))
    mask, beta = torch.ones(1, 2), 0.1
    loss, stats = grpo_loss(
        logp,
        old,
        _t([0.0]),
        mask,
        eps_low=0.2,
        eps_high=10.0,
        beta=beta,
        ref_logp=ref,
        aggregation="dapo",
        kl_ratio_correction=True,
    )
    d = np.log([0.25, 0.4]) - np.log([0.5, 0.2])
    k3, ratio = np.exp(d) - d - 1, np.array([2.0, 1.0])
    assert float(loss.detach()) == pytest.approx(beta * (k3 * ratio).mean(), rel=1e-6)  # A = 0: the KL term only
    assert stats["kl"] == pytest.approx(k3.mean(), rel=1e-5)  # logged before the correction
    loss.backward()
    # d/dlogp [β k3 ρ] = β (∂k3 ρ + k3 ρ) with ∂k3 = 1 - exp(ref - logp); mean over 2 tokens
    expected = beta * ((1 - np.exp(d)) * ratio + k3 * ratio) / 2
    assert np.allclose(logp.grad.numpy()[0], expected, atol=1e-6)
    plain, _ = grpo_loss(logp.detach(), old, _t([0.0]), mask, beta=beta, ref_logp=ref, aggregation="dapo")
    assert float(plain) == pytest.approx(beta * k3.mean(), rel=1e-6)  # ours: no ratio
