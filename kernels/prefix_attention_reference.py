"""Plain-torch prefix attention, forward and backward: the ground truth for the kernels'
tests and the "torch" backend's path of the ``fastpeft::prefix_attention`` ops. Math, shapes and
layouts in :mod:`fastpeft.kernels.prefix_attention`. The probabilities ``[B, H_q, T_q, P + T_k]``
are materialized (with the prefix expanded to the batch): fine on CPU, what the kernels avoid.
"""

from __future__ import annotations

import math

import torch

from fastpeft.kernels.prefix_attention_launch import empty_output


def _prefix_heads(prefix: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``[P, H_kv, D]`` or ``[B, P, H_kv, D]`` -> ``[1 or B, H_q, P, D]`` (each kv head repeated ``group`` times)."""
    prefix = prefix.unsqueeze(0) if prefix.dim() == 3 else prefix
    return prefix.transpose(1, 2).repeat_interleave(group, dim=1).to(dtype)


def _reference_scores(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, scale, seq_mask):
    """Masked logits ``[B, H_q, T_q, P + T_k]`` and the values ``[B, H_q, P + T_k, D]`` they weigh."""
    batch, h_q, t_q, _ = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group = h_q // h_kv
    keys = k.repeat_interleave(group, dim=1)
    values = v.repeat_interleave(group, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * scale
    if seq_mask is None:
        rows = torch.arange(t_q, device=q.device)[:, None] + (t_k - t_q)
        seq_mask = (torch.arange(t_k, device=q.device)[None, :] <= rows)[None, None]
        if key_padding_mask is not None:
            seq_mask = seq_mask & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~seq_mask, float("-inf"))
    if prefix_k is not None:
        pk, pv = _prefix_heads(prefix_k, group, q.dtype), _prefix_heads(prefix_v, group, q.dtype)
        prefix_scores = (q @ pk.transpose(-1, -2)) * scale
        if prefix_logit_bias is not None:
            prefix_scores = prefix_scores + prefix_logit_bias.reshape(()).to(q.dtype)
        scores = torch.cat([prefix_scores, scores], dim=-1)
        values = torch.cat([pv.expand(batch, -1, -1, -1), values], dim=-2)
    return scores, values


def prefix_attention_probs_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    prefix_logit_bias: torch.Tensor | None = None,
    scale: float | None = None,
    seq_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable reference returning (probs ``[B, H_q, T_q, P + T_k]``, values
    ``[B, H_q, P + T_k, D]``, lse ``[B, H_q, T_q]``). ``seq_mask`` (bool, broadcastable to
    ``[B, H_q, T_q, T_k]``, True = attend) replaces the causal + padding mask when given."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores, values = _reference_scores(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, scale, seq_mask
    )
    visible = torch.isfinite(scores).any(dim=-1, keepdim=True)
    # rows with nothing visible get finite logits before softmax so autograd never sees NaN
    safe = torch.where(visible, scores, torch.zeros_like(scores))
    probs = torch.softmax(safe, dim=-1) * visible
    lse = torch.logsumexp(safe, dim=-1, keepdim=True).masked_fill(~visible, math.inf)
    return probs, values, lse.squeeze(-1)


def prefix_attention_forward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    prefix_logit_bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference with the launcher's signature: (o ``[B, H_q, T_q, D]``, lse ``[B, H_q, T_q]``)."""
    probs, values, lse = prefix_attention_probs_reference(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, scale
    )
    return probs @ values, lse.float()


def prefix_attention_backward_reference(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    prefix_logit_bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    need_bias_grad: bool = True,
    need_dq: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """The kernels' backward in torch, same signature and output layouts as
    :func:`fastpeft.kernels.prefix_attention_bwd.prefix_attention_backward`: probabilities
    recomputed from ``lse`` (``p = exp(s - lse)``, 0 where masked and on rows with ``lse = +inf``),
    then the formulas of the module docstring."""
    batch, h_q, t_q, head_dim = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    group, n_prefix = h_q // h_kv, prefix_k.shape[-3] if prefix_k is not None else 0
    scores, values = _reference_scores(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_logit_bias, scale, None)
    p = torch.exp(scores.float() - lse[..., None]).to(q.dtype)  # [B, H_q, T_q, P + T_k]; fp32 lse
    grad_out = grad_out.to(q.dtype)
    delta = (grad_out * out).sum(-1, keepdim=True)
    ds = p * (grad_out @ values.transpose(-1, -2) - delta)
    dk_all = (ds.transpose(-1, -2) @ q) * scale  # [B, H_q, P + T_k, D]
    dv_all = p.transpose(-1, -2) @ grad_out

    def per_kv_head(t: torch.Tensor) -> torch.Tensor:  # [B, H_q, L, D] -> [B, H_kv, L, D]
        return t.reshape(batch, h_kv, group, t.shape[2], head_dim).sum(2)

    def like_kernel(t: torch.Tensor, heads: int, length: int) -> torch.Tensor:  # [B, H, L, D] view of [B, L, H, D]
        return empty_output((batch, length, heads, head_dim), q.dtype, q.device).transpose(1, 2).copy_(t)

    dq = None
    if need_dq:
        dq = ds[..., n_prefix:] @ k.repeat_interleave(group, dim=1)
        if prefix_k is not None:
            dq = dq + ds[..., :n_prefix] @ _prefix_heads(prefix_k, group, q.dtype)
        dq = like_kernel(dq * scale, h_q, t_q)
    dk = like_kernel(per_kv_head(dk_all[:, :, n_prefix:]), h_kv, t_k)
    dv = like_kernel(per_kv_head(dv_all[:, :, n_prefix:]), h_kv, t_k)
    dprefix_k = dprefix_v = dbias = None
    if prefix_k is not None:
        dpk = per_kv_head(dk_all[:, :, :n_prefix]).transpose(1, 2)  # [B, P, H_kv, D]
        dpv = per_kv_head(dv_all[:, :, :n_prefix]).transpose(1, 2)
        if prefix_k.dim() == 3:  # shared prefix: one gradient for the whole batch
            dpk, dpv = dpk.sum(0), dpv.sum(0)
        dprefix_k = dpk.to(prefix_k.dtype).contiguous()
        dprefix_v = dpv.to(prefix_v.dtype).contiguous()
    if prefix_logit_bias is not None and need_bias_grad:
        dbias = ds[..., :n_prefix].sum().reshape(prefix_logit_bias.shape).to(prefix_logit_bias.dtype)
    return dq, dk, dv, dprefix_k, dprefix_v, dbias
