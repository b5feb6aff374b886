"""Preference losses: Bradley-Terry (reward models) and DPO / IPO (direct preference optimisation).

All functions take per-pair tensors of shape ``[B]`` and return a scalar loss (``reduction="mean"``,
or ``"sum"``/``"none"``); they work in the inputs' dtype promoted to at least float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")
DPO_LOSS_TYPES = ("sigmoid", "ipo")


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{name_a} and {name_b} must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must both have shape [B]")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"{name_a} ({a.dtype}) and {name_b} ({b.dtype}) must be floating point")


def _reduce(per_pair: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    if reduction == "none":
        return per_pair
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    centering_coef: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Pairwise reward-model loss.

        loss_i = −log σ(r_c,i − r_r,i − m_i) + centering_coef · (r_c,i + r_r,i)²

    ``r_chosen``, ``r_rejected``: ``[B]`` scalar rewards; ``margin`` ``[B]`` (optional, default 0)
    asks the chosen reward to lead by at least about ``m_i``; the centering term (Eisenstein et al.)
    pulls the mean reward of each pair toward 0 so rewards stay comparable across prompts.
    ``−log σ(x)`` is computed as ``softplus(−x)``, stable for large ``|x|``.
    """
    _check_pair("r_chosen", r_chosen, "r_rejected", r_rejected)
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        if margin.shape != diff.shape:
            raise ValueError(f"margin {tuple(margin.shape)} must match the rewards' shape {tuple(diff.shape)}")
        diff = diff - margin.to(diff)
    per_pair = F.softplus(-diff)
    if centering_coef:
        if centering_coef < 0:
            raise ValueError(f"centering_coef must be >= 0, got {centering_coef}")
        per_pair = per_pair + centering_coef * (r_chosen.float() + r_rejected.float()) ** 2
    return _reduce(per_pair, reduction)


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs with ``r_chosen > r_rejected`` (ties count as wrong)."""
    _check_pair("r_chosen", r_chosen, "r_rejected", r_rejected)
    if r_chosen.numel() == 0:
        raise ValueError("pairwise_accuracy needs at least one pair")
    return float((r_chosen > r_rejected).float().mean())


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss on sequence log-probabilities ``[B]`` of the chosen / rejected completions.

        h_i = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))
        sigmoid:  loss_i = −(1 − ε) · log σ(β h_i) − ε · log σ(−β h_i)     (ε = label_smoothing, cDPO)
        ipo:      loss_i = (h_i − 1 / (2β))²

    IPO is usually applied to length-averaged log-probs (the DPO trainer does that for
    ``loss_type="ipo"``). Returns ``(loss, chosen_rewards, rejected_rewards)`` where the implicit
    rewards ``β (log π − log π_ref)`` are detached ``[B]`` tensors (for logging and accuracy).
    """
    _check_pair("policy_chosen_logps", policy_chosen_logps, "policy_rejected_logps", policy_rejected_logps)
    _check_pair("ref_chosen_logps", ref_chosen_logps, "ref_rejected_logps", ref_rejected_logps)
    if policy_chosen_logps.shape != ref_chosen_logps.shape:
        raise ValueError(
            f"policy log-probs {tuple(policy_chosen_logps.shape)} and reference log-probs "
            f"{tuple(ref_chosen_logps.shape)} must have the same shape"
        )
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen - rejected
    if loss_type == "sigmoid":
        per_pair = (1 - label_smoothing) * F.softplus(-beta * h) + label_smoothing * F.softplus(beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    return _reduce(per_pair, reduction), (beta * chosen).detach(), (beta * rejected).detach()
