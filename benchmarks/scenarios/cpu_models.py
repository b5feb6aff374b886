"""cpu-models: whole-model sampling, greedy decoding and QLoRA training steps on the CPU, fastpeft vs
transformers + PEFT (+ bitsandbytes NF4), interleaved rounds on the same random checkpoint.

Model: ``cpu-34M`` (``llama_configs``), bf16, LoRA r 16 alpha 32 on all 7 projections.
- sampling: N continuations of one 128-token prompt, 128 new tokens each, temperature 1: our sampler
  (prompt prefilled once, its KV shared by the N rows) vs ``generate`` on the prompt repeated N times;
- greedy: 8 distinct 128-token prompts, 128 new tokens each, temperature 0;
- training: one QLoRA step at batch 1 (gradient checkpointing, AdamW) vs HF + bnb + PEFT.

Targets (issue 17): QLoRA sampling N=16 >= 1.5x, N=64 >= 2x; LoRA sampling N=16 >= 2x; greedy over
distinct prompts >= 1.1x; the QLoRA training step >= 1.0x at seq 128 and 1024.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import cpu_workloads, formulas
from ..harness import BASELINE, OURS, Case, Context, ImplSpec, Prepared, Unavailable
from ..llama_configs import checkpoint_dir, formula_dims

NAME = "cpu-models"
TITLE = "CPU: QLoRA/LoRA sampling, greedy decoding, QLoRA training step (interleaved vs HF + PEFT + bnb)"
IMPL_NAMES = ("ours (fastpeft)", "HF + PEFT (+ bnb)")
SIZE, PROMPT, NEW, GREEDY_PROMPTS, GREEDY_NEW, SEQS = "cpu-34M", 128, 128, 8, 128, (128, 1024)
SMALL = ("tiny", 8, 4, 3, 4, (16, 32))
SAMPLING = (
    ("QLoRA", True, 16, ("speedup", 1.5)),
    ("QLoRA", True, 64, ("speedup", 2.0)),
    ("LoRA", False, 16, ("speedup", 2.0)),
)


def _models(ctx: Context, size: str, quantized: bool) -> tuple[object, object]:
    """(ours, HF) inference models of ``size`` on one checkpoint, shared by this run's cases."""
    if ctx.device.type != "cpu":
        raise Unavailable("a CPU scenario: run it with --device cpu")
    key = f"models-{size}-{quantized}"
    if key not in ctx.cache:
        directory = checkpoint_dir(ctx, size)
        ctx.cache[key] = (
            cpu_workloads.fastpeft_model(directory, quantized, ctx.device),
            cpu_workloads.hf_model(directory, quantized, training=False, device=ctx.device),
        )
    return ctx.cache[key]


def _generate_impls(
    size: str, quantized: bool, num_prompts: int, n: int, prompt: int, new: int, temperature: float
) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        ours_model, hf_model = _models(ctx, size, quantized)
        prompts = cpu_workloads.prompt_ids(num_prompts, prompt, formula_dims(size)["vocab"])

        def ours() -> Prepared:
            run = cpu_workloads.ours_generate(ours_model, prompts, n, new, temperature)
            return Prepared(run=run, backend="torch")

        def hf() -> Prepared:
            return Prepared(run=cpu_workloads.hf_generate_call(hf_model, prompts, n, new, temperature))

        return [ImplSpec(IMPL_NAMES[0], OURS, ours), ImplSpec(IMPL_NAMES[1], BASELINE, hf)]

    return make


def _training_impls(size: str, seq: int) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        if ctx.device.type != "cpu":
            raise Unavailable("a CPU scenario: run it with --device cpu")
        directory, vocab = checkpoint_dir(ctx, size), formula_dims(size)["vocab"]

        def ours() -> Prepared:
            return Prepared(run=cpu_workloads.ours_training_step(directory, 1, seq, vocab, ctx.device), backend="torch")

        def hf() -> Prepared:
            return Prepared(run=cpu_workloads.hf_training_step(directory, 1, seq, vocab, ctx.device))

        return [ImplSpec(IMPL_NAMES[0], OURS, ours), ImplSpec(IMPL_NAMES[1], BASELINE, hf)]

    return make


def cases(small: bool) -> list[Case]:
    size, prompt, new, greedy_prompts, greedy_new, seqs = (
        SMALL if small else (SIZE, PROMPT, NEW, GREEDY_PROMPTS, GREEDY_NEW, SEQS)
    )
    dims = formula_dims(size)
    out = []
    step_bytes = formulas.llama_decode_step_bytes(**dims, r=16, double_quant=True)
    for label, quantized, n, target in SAMPLING:
        n = n // 8 if small else n
        out.append(
            Case(
                scenario=NAME,
                group=f"{label} sampling, prompt {prompt} + {new} new",
                x_name="N",
                x=n,
                make_impls=_generate_impls(size, quantized, 1, n, prompt, new, 1.0),
                metric="GB/s",
                bytes=step_bytes * new,
                interleaved=True,
                target=target,
            )
        )
    for label, quantized in (("QLoRA", True), ("LoRA", False)):
        out.append(
            Case(
                scenario=NAME,
                group=f"{label} greedy, distinct prompts of {prompt} + {greedy_new} new",
                x_name="prompts",
                x=greedy_prompts,
                make_impls=_generate_impls(size, quantized, greedy_prompts, 1, prompt, greedy_new, 0.0),
                metric="GB/s",
                bytes=step_bytes * greedy_new,
                interleaved=True,
                target=("speedup", 1.1),
            )
        )
    for seq in seqs:
        flops = formulas.llama_qlora_step_flops(**dims, batch=1, seq=seq, r=16)
        out.append(
            Case(
                scenario=NAME,
                group="QLoRA training step, batch 1",
                x_name="seq",
                x=seq,
                make_impls=_training_impls(size, seq),
                metric="TFLOP/s",
                flops=flops,
                interleaved=True,
                target=("speedup", 1.0),
            )
        )
    if small:  # the harness check in CI: one case of each kind is enough
        out = [out[0], out[len(SAMPLING)], out[-1]]
    return out
