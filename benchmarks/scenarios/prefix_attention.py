"""prefix-attention: causal attention where every query also sees a learned P-vector prefix.

ours: ``fastpeft.kernels.prefix_attention.prefix_attention`` (prefix never expanded or concatenated);
baselines: SDPA with the prefix concatenated into K/V and a boolean mask (what prefix tuning does
today), and SDPA causal without any prefix (a different, smaller op: shown as the speed to aim at,
excluded from "fastest baseline"). Forward, and forward + backward (grads wrt q, k, v and the
prefix). TFLOP/s counts only attended pairs (``formulas.attention_flops``); floor = those FLOPs at
the measured bf16 GEMM rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import baselines, bindings, formulas
from ..harness import BASELINE, OURS, Case, Context, ImplSpec, Prepared

NAME = "prefix-attention"
TITLE = "attention with a learned prefix, bf16"
IMPL_NAMES = ("ours (prefix attention)", "SDPA prefix concat + mask", "SDPA causal, no prefix")
DTYPE = torch.bfloat16
TOLERANCE = 2e-2
SHAPE = dict(b=8, h=32, p=32, d=128)
SEQ_LENS = (512, 2048)
SMALL_SHAPE = dict(b=2, h=2, p=3, d=64)
SMALL_SEQ_LENS = (9, 33)
MODES = ("fwd", "fwd+bwd")


def reference64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    grad_out: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Output (and dq, dk, dv, dprefix_k, dprefix_v) in float64, one batch element at a time.

    q, k, v ``[B, H, T, D]``; prefix ``[P, H, D]``; the prefix gradient is summed over the batch.
    """
    b, _h, t, d = q.shape
    p = prefix_k.shape[0]
    backward = grad_out is not None
    mask = baselines.prefix_mask(t, p, q.device)
    pk, pv = (x.detach().double().permute(1, 0, 2).requires_grad_(backward) for x in (prefix_k, prefix_v))
    outs, dq, dk, dv = [], [], [], []
    dpk, dpv = torch.zeros_like(pk), torch.zeros_like(pv)
    for i in range(b):  # chunked: the full [B, H, T, P + T] float64 scores would not fit at B 8, T 2048
        qi, ki, vi = (x[i].detach().double().requires_grad_(backward) for x in (q, k, v))
        scores = (qi @ torch.cat([pk, ki], 1).transpose(1, 2)) * d**-0.5
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        oi = probs @ torch.cat([pv, vi], 1)
        outs.append(oi.detach())
        if backward:
            g = torch.autograd.grad(oi, (qi, ki, vi, pk, pv), grad_out[i].double())
            dq.append(g[0])
            dk.append(g[1])
            dv.append(g[2])
            dpk += g[3]
            dpv += g[4]
    out = torch.stack(outs)
    if not backward:
        return (out,)
    return (out, torch.stack(dq), torch.stack(dk), torch.stack(dv), dpk.permute(1, 0, 2), dpv.permute(1, 0, 2))


def _impls(b: int, h: int, t: int, p: int, d: int, backward: bool) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        gen = torch.Generator().manual_seed(b * 7919 + t)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(ctx.device, DTYPE).requires_grad_(backward)

        q, k, v = rand(b, h, t, d), rand(b, h, t, d), rand(b, h, t, d)
        prefix_k, prefix_v = rand(p, h, d), rand(p, h, d)  # [P, H_kv, D], shared by the batch
        grad_out = rand(b, h, t, d).detach() if backward else None
        with_prefix = (q, k, v, prefix_k, prefix_v)

        def prepared(
            op: Callable[[], torch.Tensor],
            inputs: Sequence[torch.Tensor],
            checked: bool,
            flops: float | None = None,
            backend: str | None = None,
        ) -> Prepared:
            def run() -> torch.Tensor | tuple[torch.Tensor, ...]:
                if not backward:
                    with torch.no_grad():
                        return op()
                out = op()
                return (out, *torch.autograd.grad(out, tuple(inputs), grad_out))

            ref = (lambda: reference64(*with_prefix, grad_out)) if checked else None
            return Prepared(run=run, reference=ref, backend=backend, flops=flops)

        def ours() -> Prepared:
            fn = bindings.prefix_attention()
            return prepared(lambda: fn(*with_prefix), with_prefix, True, backend=bindings.kernel_backend(q))

        def concat() -> Prepared:
            mask = baselines.prefix_mask(t, p, ctx.device)
            return prepared(lambda: baselines.sdpa_prefix_concat(*with_prefix, mask), with_prefix, True)

        def causal() -> Prepared:
            flops = formulas.attention_flops(b, h, t, 0, d, backward=backward)
            return prepared(lambda: baselines.sdpa_causal(q, k, v), (q, k, v), False, flops=flops)

        return [
            ImplSpec(IMPL_NAMES[0], OURS, ours),
            ImplSpec(IMPL_NAMES[1], BASELINE, concat),
            ImplSpec(IMPL_NAMES[2], BASELINE, causal, comparable=False),
        ]

    return make


def cases(small: bool) -> list[Case]:
    shape, seq_lens = (SMALL_SHAPE, SMALL_SEQ_LENS) if small else (SHAPE, SEQ_LENS)
    b, h, p, d = shape["b"], shape["h"], shape["p"], shape["d"]
    out = []
    for mode in MODES:
        backward = mode == "fwd+bwd"
        for t in seq_lens:
            flops = formulas.attention_flops(b, h, t, p, d, backward=backward)
            out.append(
                Case(
                    scenario=NAME,
                    group=f"{mode} B{b} H{h} P{p} D{d}",
                    x_name="T",
                    x=t,
                    make_impls=_impls(b, h, t, p, d, backward),
                    metric="TFLOP/s",
                    flops=flops,
                    floor=("gemm", flops),
                    tolerance=TOLERANCE,
                )
            )
    return out
