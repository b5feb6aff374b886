"""cpu-kernels: fastpeft's CPU paths against bitsandbytes / transformers, interleaved rounds.

- NF4 dequantization of a 4096 x 14336 weight (blocksize 64, double quant) into the training path's
  reused buffer, and into a fresh tensor, vs ``bitsandbytes.functional.dequantize_4bit``;
- a decode-sized QLoRA linear (M rows, 4096 -> 14336, r 16, bf16) vs bitsandbytes' ``Linear4bit``
  (eval mode: its fused CPU GEMV) + PEFT's unfused LoRA; dense bf16 shown for reference;
- the LM head + cross-entropy, forward and backward (H 512, V 32000, bf16): our chunked loss vs
  what ``LlamaForCausalLM(labels=...)`` does (full logits, upcast, cross-entropy).

Targets (issue 17): dequantization >= 1.0x bitsandbytes; the decode linear <= 2x bitsandbytes'
time; the loss >= 1.0x at every length.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .. import baselines, cpu_workloads, formulas
from ..harness import BASELINE, OURS, Case, Context, ImplSpec, Prepared, Unavailable
from .linear_common import make_tensors, reference64

NAME = "cpu-kernels"
TITLE = "CPU: NF4 dequantization, decode QLoRA linear, LM-head loss (interleaved vs bnb / HF)"
IMPL_NAMES = (
    "ours",
    "ours (fresh tensor)",
    "bitsandbytes",
    "bnb NF4 + LoRA (unfused)",
    "dense bf16 + LoRA",
    "ours (chunked loss)",
    "HF (full logits + CE)",
)
DEQUANT, SMALL_DEQUANT = (4096, 14336), (64, 96)
DECODE, SMALL_DECODE = ((4096, 14336, (1, 16)),), ((64, 96, (5,)),)
LOSS, SMALL_LOSS = (512, 32000, (127, 1023, 2047)), (32, 100, (33,))


def _cpu_only(ctx: Context) -> None:
    if ctx.device.type != "cpu":
        raise Unavailable("a CPU scenario: run it with --device cpu")


def _dequant_impls(k: int, n: int, dtype: torch.dtype) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        _cpu_only(ctx)
        from fastpeft.kernels.nf4 import quantize_nf4
        from fastpeft.kernels.nf4_dequantize import dequantize_nf4, dequantize_nf4_reference

        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k**0.5
        q = quantize_nf4(w, 64, double_quant=True)
        exact = lambda: (dequantize_nf4_reference(q, dtype).double(),)  # noqa: E731  # the bits to reproduce

        def ours() -> Prepared:
            buf = torch.empty(q.shape, dtype=dtype)
            return Prepared(run=lambda: dequantize_nf4(q, dtype, out=buf), reference=exact, backend="torch")

        def fresh() -> Prepared:
            return Prepared(run=lambda: dequantize_nf4(q, dtype), reference=exact, backend="torch")

        def bnb() -> Prepared:
            functional = baselines.import_optional("bitsandbytes.functional")
            packed, state = q.to_bnb()
            state = copy.copy(state)
            state.dtype = dtype
            return Prepared(run=lambda: functional.dequantize_4bit(packed, state), reference=exact)

        return [
            ImplSpec(IMPL_NAMES[0], OURS, ours),
            ImplSpec(IMPL_NAMES[1], OURS, fresh),
            ImplSpec(IMPL_NAMES[2], BASELINE, bnb),
        ]

    return make


def _decode_impls(m: int, k: int, n: int, r: int) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        _cpu_only(ctx)
        from fastpeft.kernels.lora_linear import lora_linear
        from fastpeft.kernels.nf4 import quantize_nf4
        from fastpeft.kernels.nf4_dequantize import dequantize_nf4_reference

        t = make_tensors(m, k, n, r, ctx.device, train=False)

        def prepared(op: Callable[[], torch.Tensor], w_exact: torch.Tensor, backend: str | None = None) -> Prepared:
            def run() -> torch.Tensor:
                with torch.no_grad():
                    return op()

            return Prepared(run=run, reference=lambda: reference64(t, w_exact, False), backend=backend)

        def ours() -> Prepared:
            q = quantize_nf4(t.w, 64, double_quant=True)
            op = lambda: lora_linear(t.x, q, None, t.lora_A, t.lora_B, t.scaling)  # noqa: E731
            return prepared(op, dequantize_nf4_reference(q, torch.float32), "torch")

        def bnb() -> Prepared:
            layer = baselines.bnb_nf4_linear(t.w, blocksize=64, double_quant=True).eval()  # PEFT at inference
            w_exact = baselines.bnb_dequantized_fp32(layer)  # before its first CPU forward repacks it
            return prepared(lambda: baselines.bnb_lora_linear(layer, t.x, t.lora_A, t.lora_B, t.scaling), w_exact)

        def dense() -> Prepared:
            return prepared(lambda: baselines.dense_lora_linear(t.x, t.w, t.lora_A, t.lora_B, t.scaling), t.w.float())

        return [
            ImplSpec(IMPL_NAMES[0], OURS, ours),
            ImplSpec(IMPL_NAMES[3], BASELINE, bnb),
            ImplSpec(IMPL_NAMES[4], BASELINE, dense, comparable=False),
        ]

    return make


def _loss_impls(rows: int, hidden: int, vocab: int) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        _cpu_only(ctx)
        h, w, labels = cpu_workloads.loss_inputs(rows, hidden, vocab, ctx.device)
        ref = lambda: cpu_workloads.loss_reference64(h, w, labels)  # noqa: E731

        def ours() -> Prepared:
            return Prepared(run=lambda: cpu_workloads.ours_loss_backward(h, w, labels), reference=ref, backend="torch")

        def hf() -> Prepared:
            return Prepared(run=lambda: cpu_workloads.hf_loss_backward(h, w, labels), reference=ref)

        return [ImplSpec(IMPL_NAMES[5], OURS, ours), ImplSpec(IMPL_NAMES[6], BASELINE, hf)]

    return make


def cases(small: bool) -> list[Case]:
    out = []
    k, n = SMALL_DEQUANT if small else DEQUANT
    nf4_bytes = formulas.nf4_weight_bytes(k, n, 64, True)
    for dtype in (torch.bfloat16,) if small else (torch.bfloat16, torch.float32):
        written = k * n * dtype.itemsize
        out.append(
            Case(
                scenario=NAME,
                group=f"NF4 dequantize {k}x{n} to {str(dtype)[6:]}",
                x_name="N",
                x=n,
                make_impls=_dequant_impls(k, n, dtype),
                metric="GB/s",
                bytes=nf4_bytes + written,
                tolerance=1e-7,
                interleaved=True,
                target=("speedup", 1.0),
            )
        )
    r = 4 if small else 16
    for k, n, rows in SMALL_DECODE if small else DECODE:
        nf4_bytes = formulas.nf4_weight_bytes(k, n, 64, True)
        for m in rows:
            out.append(
                Case(
                    scenario=NAME,
                    group=f"decode QLoRA linear {k}→{n} bf16",
                    x_name="M",
                    x=m,
                    make_impls=_decode_impls(m, k, n, r),
                    metric="GB/s",
                    flops=formulas.lora_linear_flops(m, k, n, r),
                    bytes=formulas.lora_linear_bytes(m, k, n, r, nf4_bytes),
                    tolerance=2e-2,
                    interleaved=True,
                    target=("time_ratio", 2.0) if m == 1 else None,
                )
            )
    hidden, vocab, lengths = SMALL_LOSS if small else LOSS
    for t in lengths:
        flops = 3 * 2 * t * hidden * vocab  # logits, dH, dW
        out.append(
            Case(
                scenario=NAME,
                group=f"LM head + cross-entropy fwd+bwd H{hidden} V{vocab} bf16",
                x_name="T",
                x=t,
                make_impls=_loss_impls(t, hidden, vocab),
                metric="TFLOP/s",
                flops=flops,
                tolerance=2e-2,
                interleaved=True,
                target=("speedup", 1.0),
            )
        )
    return out
