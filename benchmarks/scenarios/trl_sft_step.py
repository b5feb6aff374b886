"""trl-sft-step: one ``trl.SFTTrainer`` step on a QLoRA PeftModel, PEFT as is vs patched by fastpeft.

The model is what a QLoRA user trains: a random-weight Llama loaded in bitsandbytes NF4 (bf16
compute), ``prepare_model_for_kbit_training`` (gradient checkpointing on), PEFT LoRA r 16 / alpha 32
on all 7 projections (``baselines.hf_bnb_peft_model``, the anchors' setup). Four rows per case, one
model each, every one through a real ``SFTTrainer`` (bf16, AdamW, pre-tokenised rows, no packing):

- baseline: that PeftModel as is, and the same with ``torch_compile=True``;
- ours: the same PeftModel after ``fastpeft.patch_peft_model`` (PEFT's parameters, bnb's NF4 bytes,
  fastpeft's fused kernels), with compile off and on.

Step times come from a ``TrainerCallback`` (synchronised), the median over the timed steps after
warm-up; tokens/s = batch · seq / that median; peak memory is CUDA's ``max_memory_allocated`` over
the timed steps (absolute: model, optimizer and activations), or the RSS rise on CPU. ``--small``
runs the "tiny" config on CPU with the ``eager`` compile backend (Dynamo capture without Inductor
code generation) and no gradient checkpointing (tracing it costs a minute on CPU): a smoke test of
the harness, not a timing.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from .. import baselines, formulas
from ..harness import BASELINE, OURS, Case, Context, ImplSpec, Measured, PeakMemory, memory_kind, synchronize
from ..llama_configs import checkpoint_dir, formula_dims

NAME = "trl-sft-step"
TITLE = "TRL SFTTrainer QLoRA step: PEFT + bnb as is vs fastpeft.patch_peft_model, torch.compile off/on"
IMPL_NAMES = ("PEFT + bnb, patched", "PEFT + bnb, patched, compiled", "PEFT + bnb", "PEFT + bnb, compiled")
CASES = (("1.2B", 4, 2048), ("8B", 1, 2048))  # (size, batch, seq): the anchors' whole-step shapes
SMALL_CASES = (("tiny", 2, 32),)


def _step_timer(device: torch.device, warmup: int):
    """A TrainerCallback recording the wall time of each step after ``warmup`` (and resetting the
    CUDA peak when the timed steps begin)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            if state.global_step == warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            if state.global_step > warmup:  # global_step already counts this step
                self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def sft_step(
    model_dir: str,
    vocab: int,
    batch: int,
    seq: int,
    device: torch.device,
    *,
    patch: bool,
    compile_backend: str | None,
    warmup: int,
    steps: int,
    checkpointing: bool = True,
) -> Measured:
    """Time ``steps`` SFTTrainer steps (after ``warmup``) of the bnb + PEFT model, patched or not."""
    trl = baselines.import_optional("trl")
    datasets = baselines.import_optional("datasets")
    import fastpeft
    from fastpeft.training.tokenizer import load_char_tokenizer

    on_cpu = device.type != "cuda"
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, vocab, (batch * (warmup + steps), seq), generator=generator)
    with PeakMemory(device) if on_cpu else contextlib.nullcontext() as cpu_window, tempfile.TemporaryDirectory() as out:
        model = baselines.hf_bnb_peft_model(model_dir, device, training=True)
        if not checkpointing:
            model.gradient_checkpointing_disable()
        if patch:
            fastpeft.patch_peft_model(model)
        timer = _step_timer(device, warmup)
        args = trl.SFTConfig(
            output_dir=out,
            max_steps=warmup + steps,
            per_device_train_batch_size=batch,
            learning_rate=1e-4,
            bf16=True,
            gradient_checkpointing=checkpointing,
            max_length=seq,
            packing=False,
            save_strategy="no",
            logging_steps=1,
            report_to=[],
            disable_tqdm=True,
            use_cpu=on_cpu,
            dataloader_num_workers=0,
            torch_compile=compile_backend is not None,
            torch_compile_backend=compile_backend,
            seed=0,
        )
        trainer = trl.SFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_dict({"input_ids": rows.tolist()}),
            processing_class=load_char_tokenizer(),
            callbacks=[timer],
        )
        trainer.train()
        peak = torch.cuda.max_memory_allocated(device) if not on_cpu else None
        loss = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
        del trainer, model
    median_ms = statistics.median(timer.times) * 1e3
    return Measured(
        median_ms=median_ms,
        peak_mem_bytes=cpu_window.peak if on_cpu else peak,
        extra={
            "tokens_per_s": batch * seq / (median_ms * 1e-3),
            "tokens_per_step": batch * seq,
            "final_loss": loss,
            "compile": compile_backend or "off",
            "mem": memory_kind(device) + ("" if on_cpu else " (absolute)"),
        },
    )


def _impls(size: str, batch: int, seq: int) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        warmup, steps = (1, 1) if ctx.small else (2, 5)
        backend = "eager" if ctx.small else "inductor"

        def run(patch: bool, compiled: bool) -> Callable[[], Measured]:
            def measure() -> Measured:
                return sft_step(
                    checkpoint_dir(ctx, size),
                    formula_dims(size)["vocab"],
                    batch,
                    seq,
                    ctx.device,
                    patch=patch,
                    compile_backend=backend if compiled else None,
                    warmup=warmup,
                    steps=steps,
                    checkpointing=not ctx.small,
                )

            return measure

        roles = (OURS, OURS, BASELINE, BASELINE)
        flags = ((True, False), (True, True), (False, False), (False, True))
        return [ImplSpec(name, role, run(*flag)) for name, role, flag in zip(IMPL_NAMES, roles, flags)]

    return make


def cases(small: bool) -> list[Case]:
    out = []
    for size, batch, seq in SMALL_CASES if small else CASES:
        flops = formulas.llama_qlora_step_flops(**formula_dims(size), batch=batch, seq=seq, r=baselines.LORA_RANK)
        out.append(
            Case(
                scenario=NAME,
                group=f"{size} bs{batch}",
                x_name="seq",
                x=seq,
                make_impls=_impls(size, batch, seq),
                metric="TFLOP/s",
                flops=flops,
                floor=("gemm", flops),
                self_timed=True,
            )
        )
    return out
