"""``fastpeft plan --measure``: the longest batch-1 context that fits a card, measured by the memory ledger.

For each method (full fine-tuning, LoRA, QLoRA) the ledger runs real training steps of the model
config on fake tensors (:mod:`fastpeft.training.ledger_step`) and the sequence length is searched
for the largest one whose peak fits ``gpu_memory_gib − cuda_context_gib``. The allowance stands
for what ``torch.cuda.max_memory_allocated`` does not see: the CUDA context with cuBLAS and the
kernels' modules (about 0.5 GiB on an H100) and the caching allocator's fragmentation.

Search: two probes fix the slope of the peak in the sequence length (the peak is affine in it
between the chunk-size steps of the loss), a probe at the predicted length, then bisection between
the longest length that fitted and the shortest that did not, down to ``resolution`` tokens. Every
answer is a measured step: the reported length fitted, and ``resolution`` tokens more did not.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastpeft.training.ledger_step import LedgerSpec, measure_step, reusing_models
from fastpeft.training.memory_ledger import GiB, LedgerResult
from fastpeft.training.step_design import StepDesign

DEFAULT_CUDA_CONTEXT_GIB = 1.0
RESOLUTION = 256
MAX_TOKENS = 1 << 22  # 4M tokens: beyond it the search stops and says so


@dataclasses.dataclass
class LongestContext:
    """The search's answer: ``tokens`` fitted (0: not even ``resolution`` tokens), one step more did not."""

    tokens: int
    peak_bytes: int | None  # the peak at ``tokens``
    next_peak_bytes: int | None  # the peak at ``tokens + resolution`` (None when capped)
    budget_bytes: int
    probes: list[tuple[int, int]]  # (tokens, peak bytes) of every measured step
    capped: bool = False  # True when MAX_TOKENS still fitted
    host_peak_bytes: int | None = None  # host memory the offloaded activations take at ``tokens``


def load_model_config(model: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A transformers config dict (with ``model_type``) from a dict, a config .json or a model directory."""
    if isinstance(model, dict):
        config = dict(model)
    else:
        path = Path(model)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"model config {str(path)!r} does not exist")
        config = json.loads(path.read_text())
    if "model_type" not in config:
        raise ValueError("the model config has no 'model_type' (e.g. 'llama'); the ledger builds the model from it")
    for key in ("architectures", "torch_dtype", "dtype", "transformers_version", "quantization_config"):
        config.pop(key, None)
    return config


def longest_context(
    probe: Callable[[int], int], budget_bytes: int, resolution: int = RESOLUTION, max_tokens: int = MAX_TOKENS
) -> LongestContext:
    """Largest multiple of ``resolution`` with ``probe(tokens) <= budget_bytes`` (``probe`` non-decreasing).

    Secant steps on ``probe(t) - budget`` (the peak is nearly affine in t) until a length that fits
    and one that does not bracket the answer, then regula falsi with bisection as the fallback
    whenever an interpolation fails to halve the bracket.
    """
    probes: list[tuple[int, int]] = []
    cache: dict[int, int] = {}

    def peak(tokens: int) -> int:
        if tokens not in cache:
            cache[tokens] = probe(tokens)
            probes.append((tokens, cache[tokens]))
        return cache[tokens]

    def snap(t: float) -> int:
        return int(t) // resolution * resolution

    def secant(a: int, b: int) -> float:
        slope = (cache[b] - cache[a]) / (b - a)
        return b + (budget_bytes - cache[b]) / slope if slope > 0 else 4 * b

    if peak(resolution) > budget_bytes:
        return LongestContext(0, None, cache[resolution], budget_bytes, probes)
    lo, hi, prev = resolution, None, resolution
    t = 8 * resolution
    while hi is None:  # grow from what fitted, at most 8x per step
        t = min(max(snap(t), lo + resolution), 8 * lo, max_tokens)
        if peak(t) > budget_bytes:
            hi = t
        elif t >= max_tokens:
            return LongestContext(t, cache[t], None, budget_bytes, probes, capped=True)
        else:
            prev, lo = lo, t
            t = secant(prev, lo)
    interpolate = True
    while hi - lo > resolution:
        width = hi - lo
        t = lo + (budget_bytes - cache[lo]) / max(cache[hi] - cache[lo], 1) * width if interpolate else (lo + hi) / 2
        t = min(max(snap(t), lo + resolution), hi - resolution)
        if peak(t) <= budget_bytes:
            lo = t
        else:
            hi = t
        interpolate = (interpolate and hi - lo <= width / 2) or not interpolate  # bisect once after a poor step
    return LongestContext(lo, cache[lo], peak(lo + resolution), budget_bytes, probes)


def design_for(method: str) -> StepDesign:
    """The step design the measured plan uses: the long-context design (whose tiled MLP applies to
    adapter layers; full fine-tuning gets offloaded checkpointing and lean norms)."""
    return StepDesign.long_context()


def spec_for(
    config: dict[str, Any],
    method: str,
    seq_len: int,
    lora_r: int = 16,
    batch_size: int = 1,
    design: StepDesign | None = None,
    stack: str = "fastpeft",
) -> LedgerSpec:
    design = design if design is not None else (design_for(method) if stack == "fastpeft" else StepDesign())
    return LedgerSpec(
        config,
        seq_len=seq_len,
        batch_size=batch_size,
        method=method,
        stack=stack,
        lora_r=lora_r,
        lora_alpha=2.0 * lora_r,
        design=design,
    )


def measure_longest(
    config: dict[str, Any],
    method: str,
    gpu_memory_gib: float,
    cuda_context_gib: float = DEFAULT_CUDA_CONTEXT_GIB,
    lora_r: int = 16,
    design: StepDesign | None = None,
    stack: str = "fastpeft",
    log: Callable[[str], None] | None = None,
) -> LongestContext:
    """Longest batch-1 context of ``method`` on a ``gpu_memory_gib`` card (see the module docstring)."""
    budget = int((gpu_memory_gib - cuda_context_gib) * GiB)
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_gib ({gpu_memory_gib}) must exceed the CUDA context allowance ({cuda_context_gib})"
        )

    host: dict[int, int] = {}

    def probe(tokens: int) -> int:
        result = measure_step(spec_for(config, method, tokens, lora_r, 1, design, stack))
        host[tokens] = result.host_peak_bytes
        if log:
            log(f"  {stack} {method}: {tokens:,} tokens -> {result.peak_bytes / GiB:.2f} GiB")
        return result.peak_bytes

    with reusing_models():
        found = longest_context(probe, budget)
    found.host_peak_bytes = host.get(found.tokens)
    return found


def measure_at(
    config: dict[str, Any],
    method: str,
    seq_len: int,
    batch_size: int = 1,
    lora_r: int = 16,
    design: StepDesign | None = None,
    stack: str = "fastpeft",
) -> LedgerResult:
    """The ledger of one step at ``seq_len``."""
    return measure_step(spec_for(config, method, seq_len, lora_r, batch_size, design, stack))


def measure_plan(inputs: Any, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """For ``PlanInputs``: the ledger at ``seq_len`` and the longest batch-1 context, per method."""
    config = load_model_config(inputs.model_config if inputs.model_config is not None else inputs.model)
    at_seq: dict[str, LedgerResult] = {}
    longest: dict[str, LongestContext] = {}
    for method in ("full", "lora", "qlora"):
        at_seq[method] = measure_at(config, method, inputs.seq_len, inputs.batch_size, inputs.lora_r)
        longest[method] = measure_longest(
            config, method, inputs.gpu_memory_gib, inputs.cuda_context_gib, inputs.lora_r, log=log
        )
    return {"config": config, "at_seq_len": at_seq, "longest": longest, "design": design_for("qlora").label()}


def format_measured(result: dict[str, Any], inputs: Any) -> str:
    from fastpeft.training.ledger_step import notes_for
    from fastpeft.training.memory_ledger import format_gib, format_ledger_table

    budget = inputs.gpu_memory_gib - inputs.cuda_context_gib
    lines = [
        f"memory ledger (measured): one training step (forward, backward, AdamW) per length, {result['design']}",
        f"card {inputs.gpu_memory_gib:g} GiB - {inputs.cuda_context_gib:g} GiB allowance for the CUDA context and "
        f"allocator = {budget:g} GiB for tensors; LoRA r={inputs.lora_r} on all linear layers",
        "",
        f"{'':<8}{'longest context (batch 1)':>28}{'peak there':>14}{'+' + str(RESOLUTION) + ' tokens':>14}"
        f"{'host RAM (offload)':>20}",
    ]
    for method, found in result["longest"].items():
        if found.tokens == 0:
            lines.append(
                f"{method:<8}{'does not fit':>28}{'':>14}{format_gib(found.next_peak_bytes):>14}"
                f"  (at {RESOLUTION} tokens)"
            )
            continue
        more = "(cap)" if found.capped else format_gib(found.next_peak_bytes)
        lines.append(
            f"{method:<8}{found.tokens:>21,} tokens{format_gib(found.peak_bytes):>14}{more:>14}"
            f"{format_gib(found.host_peak_bytes or 0):>20}"
        )
    lines += [
        "",
        f"ledger at {inputs.batch_size} x {inputs.seq_len} tokens:",
        format_ledger_table(result["at_seq_len"]),
        "",
    ]
    spec = spec_for(result["config"], "qlora", inputs.seq_len)
    lines += [f"note: {n}" for n in notes_for(spec)]
    return "\n".join(lines)
