"""Policy-gradient losses: GRPO (group advantages, clipped ratio, k3 KL, aggregations) and PPO
(GAE, clipped policy and value losses).

Shapes: ``N`` sequences (prompts × samples), ``T`` completion tokens (right-padded); per-token
tensors are ``[N, T]`` and ``mask`` ``[N, T]`` (1 = a real, trained completion token). Log-probs are
of the sampled token under the current policy (``logp``), the policy that sampled it (``old_logp``)
and the reference policy (``ref_logp``).

Our defaults and TRL's (``trl.GRPOTrainer`` 1.16), where they differ, each an option here:
advantages divide by the population std (TRL: the sample std, ``std_correction=1``); ``grpo`` /
``dr_grpo`` divide by the rows that have a masked-in token (TRL: by all rows,
``count_empty_rows=True``); the KL term is plain k3 (TRL: k3 times the importance ratio,
``kl_ratio_correction=True``). Everything else (ε-clipping, k3, the three aggregations, eps = 1e-4)
is the same.
"""

from __future__ import annotations

import torch

ADVANTAGE_SCALES = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "dr_grpo", "dapo")


def _check_same(**tensors: torch.Tensor | None) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match: {shapes}")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    valid: torch.Tensor | None = None,
    eps: float = 1e-4,
    std_correction: int = 0,
) -> torch.Tensor:
    """Group-relative advantages for ``rewards`` ``[N]`` laid out as ``N / G`` groups of ``G`` samples.

        A_i = (r_i − mean_g(r)) / (s + eps)
        scale="group": s = std_g(r)    (std within the sample's group, GRPO)
        scale="batch": s = std(r)      (std over every valid reward of the batch)
        scale="none":  A_i = r_i − mean_g(r)   (no std normalisation, Dr. GRPO)

    ``std_correction``: s = sqrt(Σ (r − mean)² / (n − c)). Ours, c = 0: the population std, fine for
    a group of one. TRL's, c = 1: the sample std (Bessel's correction, TRL's ``nanstd``); a group
    with n <= c valid rewards then gets s = 0. ``valid`` ``[N]``
    (bool) marks samples whose reward exists; invalid samples get advantage 0 and are left out of
    every mean and std (a NaN reward there is ignored). A group whose rewards are all equal gets
    advantage 0 (never NaN), since it carries no signal about which sample is better.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [N], got {tuple(rewards.shape)}")
    if group_size <= 0 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if std_correction not in (0, 1):
        raise ValueError(f"std_correction must be 0 (population std) or 1 (sample std), got {std_correction!r}")
    valid = torch.isfinite(rewards) if valid is None else valid.bool() & torch.isfinite(rewards)
    _check_same(rewards=rewards, valid=valid)
    r = torch.where(valid, rewards.double(), 0.0).view(-1, group_size)
    v = valid.view(-1, group_size).double()
    count = v.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (r * v).sum(dim=1, keepdim=True) / count
    centered = (r - mean) * v
    if scale == "group":
        dof = v.sum(dim=1, keepdim=True) - std_correction
        denom = torch.where(dof > 0, (centered**2).sum(dim=1, keepdim=True) / dof.clamp(min=1), 0.0).sqrt() + eps
    elif scale == "batch":
        n = v.sum()
        batch_mean = (r * v).sum() / n.clamp(min=1)
        squares = (((r - batch_mean) * v) ** 2).sum()
        denom = torch.where(n - std_correction > 0, squares / (n - std_correction).clamp(min=1), 0.0).sqrt() + eps
    else:
        denom = torch.ones((), dtype=torch.float64)
    return (centered / denom).view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π ‖ π_ref) (Schulman), unbiased and always >= 0:

    kl_t = exp(ref_logp_t − logp_t) − (ref_logp_t − logp_t) − 1
    """
    _check_same(logp=logp, ref_logp=ref_logp)
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate (PPO / GRPO, asymmetric clip range as in DAPO).

        ρ_t = exp(logp_t − old_logp_t)
        loss_t = −min(ρ_t · A, clip(ρ_t, 1 − eps_low, 1 + eps_high) · A)

    ``advantages``: ``[N]`` (one per sequence, broadcast over tokens) or ``[N, T]``. Returns
    ``(loss [N, T], clipped [N, T] bool)`` where ``clipped`` marks tokens whose clipped term was the
    minimum (no gradient flows through them).
    """
    _check_same(logp=logp, old_logp=old_logp)
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    if adv.shape[0] != logp.shape[0] or adv.dim() != 2:
        raise ValueError(f"advantages {tuple(advantages.shape)} do not fit log-probs {tuple(logp.shape)}")
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def aggregate_token_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "grpo",
    max_len: int | None = None,
    num_seqs: float | None = None,
    num_tokens: float | None = None,
    count_empty_rows: bool = False,
) -> torch.Tensor:
    """Reduce a per-token loss ``[N, T]`` over the ``mask``-ed tokens to a scalar.

        grpo:    (1/S) Σ_i [ Σ_t l_it m_it / Σ_t m_it ]      mean over tokens, then over sequences
        dr_grpo: Σ_it l_it m_it / (S · max_len)              constant normaliser, no length bias
        dapo:    Σ_it l_it m_it / K                          token-level mean over the whole batch

    ``S`` = number of sequences with at least one masked-in token (ours), or every row, N, with
    ``count_empty_rows=True`` (TRL's ``grpo``/``dr_grpo``: a fully masked row, e.g. a truncated or
    unscorable sample, still counts in the denominator); ``K`` = number of masked-in
    tokens, ``max_len`` = the generation budget (defaults to ``T``). When a batch is split into
    micro-batches (or ranks), pass the *global* ``num_seqs`` (S) / ``num_tokens`` (K) so the
    micro-batch losses add up to the full-batch loss.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    _check_same(per_token=per_token, mask=mask)
    m = mask.to(per_token.dtype)
    seq_tokens = m.sum(dim=1)
    if num_seqs is None:
        num_seqs = float(per_token.shape[0]) if count_empty_rows else float((seq_tokens > 0).sum())
    if mode == "grpo":
        per_seq = (per_token * m).sum(dim=1) / seq_tokens.clamp(min=1)
        return per_seq.sum() / max(num_seqs, 1.0)
    if mode == "dr_grpo":
        length = per_token.shape[1] if max_len is None else max_len
        return (per_token * m).sum() / max(num_seqs * length, 1.0)
    if num_tokens is None:
        num_tokens = float(m.sum())
    return (per_token * m).sum() / max(num_tokens, 1.0)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    aggregation: str = "grpo",
    max_len: int | None = None,
    num_seqs: float | None = None,
    num_tokens: float | None = None,
    count_empty_rows: bool = False,
    kl_ratio_correction: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO objective on one (micro-)batch.

        l_t = clipped_policy_loss_t + β · k3_kl(logp_t, ref_logp_t) [· ρ_t]
        loss = aggregate_token_loss(l, mask, aggregation)

    ``kl_ratio_correction``: multiply the KL term by the (differentiable) importance ratio
    ρ_t = exp(logp_t − old_logp_t), TRL's default ``use_bias_correction_kl`` (an unbiased
    reverse-KL gradient, DeepSeek-V3.2); ours is off. It changes the gradient even on-policy, where ρ = 1.
    ``count_empty_rows``: see :func:`aggregate_token_loss` (TRL's rows-count; ours is off).
    ``β = 0`` needs no ``ref_logp``. Returns ``(loss, stats)`` with ``stats``: ``clip_fraction`` and
    (with β > 0) ``kl`` (the k3 estimate, token mean over the mask, before any ratio correction), as
    detached 0-d tensors: no host sync per micro-batch (the recipe reads them once per step).
    """
    _check_same(logp=logp, old_logp=old_logp, mask=mask, ref_logp=ref_logp)
    per_token, clipped = clipped_policy_loss(logp, old_logp, advantages, eps_low, eps_high)
    m = mask.bool()
    n = m.sum().clamp(min=1)
    stats = {"clip_fraction": (clipped & m).sum() / n}
    if beta:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")
        kl = k3_kl(logp, ref_logp)
        stats["kl"] = (kl.detach() * m).sum() / n
        if kl_ratio_correction:
            kl = kl * torch.exp(logp - old_logp)
        per_token = per_token + beta * kl
    return aggregate_token_loss(per_token, mask, aggregation, max_len, num_seqs, num_tokens, count_empty_rows), stats


# ----------------------------------------------------------------------------------------------- PPO
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens ``[N, T]`` (mask: a prefix of each row).

        δ_t = r_t + γ · V_{t+1} · m_{t+1} − V_t
        Â_t = δ_t + γλ · m_{t+1} · Â_{t+1}            (Â and V are 0 past the last masked-in token)
        returns_t = Â_t + V_t

    The episode ends at each row's last masked-in token (terminal: no bootstrap). Outputs are 0
    where ``mask`` is 0; both are detached.
    """
    _check_same(rewards=rewards, values=values, mask=mask)
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    m = mask.to(values.dtype)
    r, v = rewards.detach() * m, values.detach() * m
    advantages = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        next_m = m[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(running)
        next_v = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(running)
        delta = r[:, t] + gamma * next_v * next_m - v[:, t]
        running = delta + gamma * lam * next_m * running
        advantages[:, t] = running
    advantages = advantages * m
    return advantages, (advantages + v) * m


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x − mean) / (std + eps)`` over the masked-in entries (population std); 0 elsewhere."""
    _check_same(x=x, mask=mask)
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    std = ((((x - mean) * m) ** 2).sum() / n).sqrt()
    return (x - mean) / (std + eps) * m


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, float]:
    """PPO clipped surrogate, token mean over the mask (``aggregate_token_loss(..., "dapo")``):

        loss = Σ_t m_t · −min(ρ_t Â_t, clip(ρ_t, 1 − ε, 1 + ε) Â_t) / Σ_t m_t

    Returns ``(loss, clip_fraction)``.
    """
    per_token, clipped = clipped_policy_loss(logp, old_logp, advantages, clip_eps, clip_eps)
    m = mask.bool()
    frac = float((clipped & m).sum()) / max(int(m.sum()), 1)
    return aggregate_token_loss(per_token, mask, "dapo", num_tokens=num_tokens), frac


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Clipped value loss, token mean over the mask:

        V^clip_t = old_V_t + clip(V_t − old_V_t, −c, c)
        loss = ½ · Σ_t m_t · max((V_t − R_t)², (V^clip_t − R_t)²) / Σ_t m_t

    ``clip_range=None`` uses the plain squared error ½ (V_t − R_t)².
    """
    _check_same(values=values, old_values=old_values, returns=returns, mask=mask)
    err = (values - returns) ** 2
    if clip_range is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return aggregate_token_loss(0.5 * err, mask, "dapo", num_tokens=num_tokens)
