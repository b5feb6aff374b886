"""Shared by decode-linear and train-linear: tensors, float64 references and the three implementations.

ours: ``fastpeft.kernels.lora_linear.lora_linear`` on ``quantize_nf4(W, 64, double_quant=True)``;
dense: bf16 ``F.linear`` on the frozen W + unfused LoRA; bnb: ``Linear4bit`` NF4 + unfused LoRA.
Each is checked against a float64 computation with the exact weight it holds (the NF4 values for
the 4-bit ones), so the relative error measures the kernel, not the quantization.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .. import baselines, bindings, formulas
from ..harness import BASELINE, OURS, Context, ImplSpec, Prepared

IMPLS = ("ours (fused NF4 + LoRA)", "dense bf16 + LoRA (unfused)", "bnb NF4 + LoRA (unfused)")
DTYPE = torch.bfloat16
TOLERANCE = 2e-2  # relative Frobenius error for bf16 outputs and gradients
LORA_ALPHA = 32


@dataclasses.dataclass
class LinearTensors:
    x: torch.Tensor  # [M, K]
    w: torch.Tensor  # [N, K], frozen
    lora_A: torch.Tensor  # [r, K]
    lora_B: torch.Tensor  # [N, r]
    grad_y: torch.Tensor | None  # [M, N], training only
    scaling: float

    @property
    def lora_bytes(self) -> int:
        return (self.lora_A.numel() + self.lora_B.numel()) * self.lora_A.element_size()


def make_tensors(m: int, k: int, n: int, r: int, device: torch.device, train: bool) -> LinearTensors:
    """Random inputs (never zeros); B is not zero-initialised so the LoRA path is really checked."""
    gen = torch.Generator().manual_seed(m * 1_000_003 + k * 1009 + n)

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=DTYPE)

    x = rand(m, k).requires_grad_(train)
    a = rand(r, k, std=k**-0.5).requires_grad_(train)
    b = rand(n, r, std=r**-0.5).requires_grad_(train)
    g = rand(m, n) if train else None
    return LinearTensors(x=x, w=rand(n, k, std=k**-0.5), lora_A=a, lora_B=b, grad_y=g, scaling=LORA_ALPHA / r)


def reference64(t: LinearTensors, w_exact: torch.Tensor, train: bool) -> tuple[torch.Tensor, ...]:
    """y (and dX, dA, dB for ``grad_y``) in float64 from the exact weight ``w_exact`` [N, K]."""
    x, a, b = (v.detach().double().requires_grad_(train) for v in (t.x, t.lora_A, t.lora_B))
    w = w_exact.detach().double()
    y = x @ w.t() + t.scaling * ((x @ a.t()) @ b.t())
    if not train:
        return (y,)
    return (y.detach(), *torch.autograd.grad(y, (x, a, b), t.grad_y.double()))


def prepare(
    op: Callable[[], torch.Tensor],
    t: LinearTensors,
    w_exact: torch.Tensor,
    train: bool,
    resident: int,
    moved: int | None,
    backend: str | None = None,
) -> Prepared:
    """Wrap a forward ``op``: decode runs it under no_grad; training also takes dX, dA, dB."""
    if train:

        def run() -> tuple[torch.Tensor, ...]:
            y = op()
            return (y, *torch.autograd.grad(y, (t.x, t.lora_A, t.lora_B), t.grad_y))

    else:

        def run() -> torch.Tensor:
            with torch.no_grad():
                return op()

    return Prepared(
        run=run, reference=lambda: reference64(t, w_exact, train), resident_bytes=resident, bytes=moved, backend=backend
    )


def linear_impls(m: int, k: int, n: int, r: int, train: bool) -> Callable[[Context], list[ImplSpec]]:
    """The implementations of one (M, K, N, r) case, allocating their tensors when called."""

    def make(ctx: Context) -> list[ImplSpec]:
        t = make_tensors(m, k, n, r, ctx.device, train)

        def moved(weight_bytes: int) -> int | None:
            return None if train else formulas.lora_linear_bytes(m, k, n, r, weight_bytes)

        def ours() -> Prepared:
            ops = bindings.lora_linear_ops()
            q = ops["quantize_nf4"](t.w, 64, double_quant=True)
            w_exact = ops["dequantize_reference"](q, torch.float32)
            return prepare(
                lambda: ops["lora_linear"](t.x, q, None, t.lora_A, t.lora_B, t.scaling),
                t,
                w_exact,
                train,
                q.nbytes + t.lora_bytes,
                moved(q.nbytes),
                ops["backend"](t.x),
            )

        def dense() -> Prepared:
            w_bytes = t.w.numel() * t.w.element_size()
            return prepare(
                lambda: baselines.dense_lora_linear(t.x, t.w, t.lora_A, t.lora_B, t.scaling),
                t,
                t.w.float(),
                train,
                w_bytes + t.lora_bytes,
                moved(w_bytes),
            )

        def bnb() -> Prepared:
            layer = baselines.bnb_nf4_linear(t.w, blocksize=64, double_quant=True)
            w_bytes = baselines.bnb_weight_bytes(layer)
            return prepare(
                lambda: baselines.bnb_lora_linear(layer, t.x, t.lora_A, t.lora_B, t.scaling),
                t,
                baselines.bnb_dequantized_fp32(layer),
                train,
                w_bytes + t.lora_bytes,
                moved(w_bytes),
            )

        return [ImplSpec(IMPLS[0], OURS, ours), ImplSpec(IMPLS[1], BASELINE, dense), ImplSpec(IMPLS[2], BASELINE, bnb)]

    return make
