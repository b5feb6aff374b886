"""sampling: N sampled continuations of one prompt on an NF4 + LoRA model ("1.2B", random weights).

ours: the batched KV-cache sampler's measuring function (bound in ``bindings.SAMPLING``);
baseline: HF ``generate`` (do_sample, exactly ``new_tokens`` per row) on bnb 4-bit + PEFT LoRA. Rows report tokens/s; GB/s counts the weight bytes every decode step must
read (``formulas.llama_decode_step_bytes`` × new tokens; the KV cache is not counted), and the
floor is those bytes at the measured copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import baselines, bindings, formulas
from ..harness import BASELINE, OURS, Case, Context, ImplSpec, Measured
from ..llama_configs import checkpoint_dir, formula_dims, llama_config

NAME = "sampling"
TITLE = "sampling N continuations (prompt 128, 256 new tokens), NF4 + LoRA"
IMPL_NAMES = ("ours (batched KV-cache sampler)", "HF generate on bnb + PEFT")
SIZE, PROMPT, NEW, NS = "1.2B", 128, 256, (16, 64)
SMALL_SIZE, SMALL_PROMPT, SMALL_NEW, SMALL_NS = "tiny", 8, 4, (2, 4)


def _cached(ctx: Context, key: str, build: Callable[[], object]) -> object:
    """One model per implementation per run of this scenario, shared by its cases (``ctx.cache``)."""
    if key not in ctx.cache:
        ctx.cache[key] = build()
    return ctx.cache[key]


def _hf_model(ctx: Context, size: str) -> object:
    return baselines.hf_bnb_peft_model(checkpoint_dir(ctx, size), ctx.device, training=False)


def _impls(size: str, n: int, prompt: int, new: int) -> Callable[[Context], list[ImplSpec]]:
    def make(ctx: Context) -> list[ImplSpec]:
        def ours() -> Measured:
            bindings.bind(bindings.SAMPLING)  # fail fast, before building a model
            model = _cached(ctx, f"ours-{size}", lambda: bindings.fastpeft_qlora_model(llama_config(size), ctx.device))
            return bindings.sampling(model, n, prompt, new, repeats=1 if ctx.small else 3)

        def hf() -> Measured:
            model = _cached(ctx, f"hf-{size}", lambda: _hf_model(ctx, size))
            return baselines.hf_generate(model, n, prompt, new, formula_dims(size)["vocab"], ctx.device)

        return [ImplSpec(IMPL_NAMES[0], OURS, ours), ImplSpec(IMPL_NAMES[1], BASELINE, hf)]

    return make


def cases(small: bool) -> list[Case]:
    size, prompt, new, ns = (SMALL_SIZE, SMALL_PROMPT, SMALL_NEW, SMALL_NS) if small else (SIZE, PROMPT, NEW, NS)
    step_bytes = formulas.llama_decode_step_bytes(**formula_dims(size), r=baselines.LORA_RANK, double_quant=True)
    return [
        Case(
            scenario=NAME,
            group=f"{size} prompt {prompt} + {new} new",
            x_name="N",
            x=n,
            make_impls=_impls(size, n, prompt, new),
            metric="GB/s",
            bytes=step_bytes * new,
            floor=("hbm", step_bytes * new),
            self_timed=True,
        )
        for n in ns
    ]
