"""Bradley-Terry and DPO/IPO losses against values computed by hand with numpy."""

import numpy as np
import pytest
import torch

from fastpeft.training.losses_preference import bradley_terry_loss, dpo_loss, pairwise_accuracy

RC = np.array([1.5, -0.25, 0.75, 2.0])
RR = np.array([0.5, 0.5, 0.75, -1.0])
MARGIN = np.array([0.0, 1.0, 0.5, 2.0])


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


def np_log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def test_bradley_terry_matches_hand_values():
    expected = -np_log_sigmoid(RC - RR)
    assert torch.allclose(bradley_terry_loss(_t(RC), _t(RR), reduction="none"), _t(expected), atol=1e-6)
    assert float(bradley_terry_loss(_t(RC), _t(RR))) == pytest.approx(expected.mean(), rel=1e-6)
    # one pair by hand: r_c - r_r = 1 -> -log(1 / (1 + e^-1)) = log(1 + e^-1) = 0.3132617
    assert float(bradley_terry_loss(_t([1.0]), _t([0.0]))) == pytest.approx(0.31326169, rel=1e-6)


def test_bradley_terry_margin_and_centering():
    coef = 0.01
    expected = -np_log_sigmoid(RC - RR - MARGIN) + coef * (RC + RR) ** 2
    got = bradley_terry_loss(_t(RC), _t(RR), margin=_t(MARGIN), centering_coef=coef, reduction="sum")
    assert float(got) == pytest.approx(expected.sum(), rel=1e-6)


def test_bradley_terry_gradient_pushes_rewards_apart():
    rc, rr = _t(RC).requires_grad_(), _t(RR).requires_grad_()
    bradley_terry_loss(rc, rr).backward()
    # d/dr_c of -log σ(d) = -(1 - σ(d)) / B
    sig = 1 / (1 + np.exp(-(RC - RR)))
    assert np.allclose(rc.grad.numpy(), -(1 - sig) / len(RC), atol=1e-6)
    assert np.allclose(rr.grad.numpy(), (1 - sig) / len(RC), atol=1e-6)


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy(_t(RC), _t(RR)) == pytest.approx(0.5)  # 1.5>0.5, 2>-1; -0.25<0.5; tie


def test_dpo_sigmoid_and_ipo_match_hand_values():
    pc, pr = np.array([-3.0, -10.0, -4.5]), np.array([-5.0, -9.0, -4.0])
    rc, rr = np.array([-4.0, -9.5, -4.5]), np.array([-4.5, -9.5, -5.0])
    beta = 0.5
    h = (pc - rc) - (pr - rr)
    loss, chosen_r, rejected_r = dpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta=beta, reduction="none")
    assert np.allclose(loss.numpy(), -np_log_sigmoid(beta * h), atol=1e-6)
    assert np.allclose(chosen_r.numpy(), beta * (pc - rc)) and np.allclose(rejected_r.numpy(), beta * (pr - rr))
    smooth = 0.1
    loss_s, _, _ = dpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta=beta, label_smoothing=smooth, reduction="none")
    expected_s = -(1 - smooth) * np_log_sigmoid(beta * h) - smooth * np_log_sigmoid(-beta * h)
    assert np.allclose(loss_s.numpy(), expected_s, atol=1e-6)
    ipo, _, _ = dpo_loss(_t(pc), _t(pr), _t(rc), _t(rr), beta=beta, loss_type="ipo")
    assert float(ipo) == pytest.approx(np.mean((h - 1 / (2 * beta)) ** 2), rel=1e-6)


def test_dpo_at_reference_is_log2_and_rewards_detached():
    x = torch.randn(5, requires_grad=True)
    loss, c, r = dpo_loss(x, x * 2, x.detach(), (x * 2).detach(), beta=0.3)
    assert float(loss.detach()) == pytest.approx(np.log(2), rel=1e-6)
    assert not c.requires_grad and not r.requires_grad


@pytest.mark.parametrize(
    "kwargs, error",
    [({"beta": 0.0}, ValueError), ({"loss_type": "hinge"}, ValueError), ({"label_smoothing": 0.5}, ValueError)],
)
def test_dpo_rejects_bad_arguments(kwargs, error):
    x = torch.randn(3)
    with pytest.raises(error):
        dpo_loss(x, x, x, x, **kwargs)


def test_shape_and_dtype_errors_name_the_inputs():
    with pytest.raises(ValueError, match="r_chosen"):
        bradley_terry_loss(torch.randn(3), torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        bradley_terry_loss(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(torch.randn(3), torch.randn(3), margin=torch.randn(2))
