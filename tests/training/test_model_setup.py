"""Optimizers, schedulers and model construction."""

from __future__ import annotations

import pytest
import torch

from fastpeft.training.model_setup import build_model, build_optimizer, build_scheduler


def _param():
    return [torch.nn.Parameter(torch.randn(300))]


def test_torch_and_bnb_8bit_optimizers_step_on_cpu():
    for name in ("adamw", "sgd", "adamw_8bit"):
        params = _param()
        before = params[0].detach().clone()
        opt = build_optimizer(name, params, 1e-2, 0.0, (0.9, 0.999), 1e-8, torch.device("cpu"))
        params[0].grad = torch.randn(300)
        opt.step()
        assert not torch.equal(before, params[0]), name


@pytest.mark.parametrize(
    "name,match",
    [("paged_adamw", "needs a CUDA device"), ("lion", "optimizer must be one of")],
)
def test_optimizer_errors(name, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, _param(), 1e-3, 0.0, (0.9, 0.999), 1e-8, torch.device("cpu"))
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("adamw", [], 1e-3, 0.0, (0.9, 0.999), 1e-8, torch.device("cpu"))


def test_scheduler_from_transformers():
    opt = torch.optim.SGD(_param(), lr=1.0)
    sched = build_scheduler("linear", opt, warmup_steps=2, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="scheduler must be one of"):
        build_scheduler("triangle", opt, 0, 4)


def test_build_model_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        build_model(None, None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model(str(tmp_path / "missing"), None)
