"""One training step of a model config under ``FakeTensorMode``, measured by the memory ledger.

``measure_step(LedgerSpec(...))`` builds the model from its config on fake CPU tensors (no weights,
no memory; fake CUDA tensors cannot run a backward without a GPU), applies the training stack —
fastpeft's (adapters, NF4, chunked LM-head loss, the :class:`StepDesign` pieces) or the HF +
bitsandbytes + PEFT baseline (:mod:`fastpeft.training.ledger_baseline`) — and runs forward, loss,
backward and an AdamW step (``foreach``, CUDA's default; its state made beforehand, as in every step
after the first) inside :class:`fastpeft.training.memory_ledger.MemoryTracker`.

How our own ops enter the ledger: each kernel is a ``fastpeft::`` custom op, so on FakeTensors its
``register_fake`` implementation runs; it allocates the op's outputs as the CUDA path does and,
because the ledger observes (:func:`fastpeft.kernels.workspace.accounting`), the workspaces that
path keeps (NF4 dequantization into one ``nf4_dequant`` buffer per dtype, the decode kernel's
split-K buffers) and the temporaries it frees inside the op (the loss's ``[C, V]`` logits chunk);
the fused LoRA op saves x and x·Aᵀ. Torch ops (SDPA, norms, the optimizer) run their fake
implementations, which allocate what their CUDA kernels do; SDPA on fake CPU tensors takes the
flash path, which saves the output and log-sum-exp like CUDA's (no ``T × T`` matrix), and
:func:`~fastpeft.training.memory_ledger.cuda_attention_rules` sends what CUDA would run on the
math backend there too.

Rows are single unpadded sequences (every token a target, no attention mask). On real tensors
transformers sees from the position ids that nothing is packed and lets SDPA run causal without a
mask; on FakeTensors it cannot read values and would build a ``[T, T]`` mask, so the step tells it
what the values would have shown (:func:`_unpacked_rows`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fastpeft.kernels.backend import force_backend
from fastpeft.kernels.linear_cross_entropy import linear_cross_entropy
from fastpeft.kernels.nf4 import dynamic_map, nf4_code
from fastpeft.kernels.workspace import isolated_workspaces
from fastpeft.training.memory_ledger import LedgerResult, MemoryTracker, cuda_attention_rules
from fastpeft.training.step_design import StepDesign, apply_step_design

STACKS = ("fastpeft", "hf_peft")
METHODS = ("full", "lora", "qlora")


@dataclasses.dataclass
class LedgerSpec:
    """What one measured step trains. ``model_config``: transformers config fields with ``model_type``."""

    model_config: dict[str, Any]
    seq_len: int = 2048
    batch_size: int = 1
    method: str = "qlora"
    stack: str = "fastpeft"
    lora_r: int = 16
    lora_alpha: float = 32.0
    dtype: str = "bfloat16"
    design: StepDesign = dataclasses.field(default_factory=StepDesign)

    def __post_init__(self) -> None:
        if self.stack not in STACKS:
            raise ValueError(f"stack must be one of {STACKS}, got {self.stack!r}")
        if self.method not in METHODS or (self.stack == "hf_peft" and self.method == "full"):
            raise ValueError(
                f"method must be one of {METHODS} ('full' only for the fastpeft stack), got {self.method!r}"
            )
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {self.seq_len} and {self.batch_size}")
        if "model_type" not in self.model_config:
            raise ValueError("model_config needs a 'model_type' such as 'llama'")


def notes_for(spec: LedgerSpec) -> list[str]:
    """What the numbers stand for, printed with every ledger table."""
    notes = [
        "fake CPU tensors under FakeTensorMode: bytes of tensor storage alive at once, not a timing; "
        "allocator rounding and fragmentation and the CUDA context are not included"
    ]
    if spec.stack == "fastpeft":
        notes.append(
            "fastpeft ops enter through their fake implementations, which report the CUDA path's "
            "workspaces and temporaries: NF4 dequant into one workspace per dtype, fused LoRA saves x "
            "and x·Aᵀ, the chunked LM-head loss's [C, V] chunk"
        )
    else:
        notes.append(
            "bitsandbytes ops do not run on FakeTensors: each Linear4bit is a stand-in holding its "
            "NF4 bytes and making bnb's per-call dense dequantized weight (ledger_baseline.py)"
        )
    return notes


@contextlib.contextmanager
def fake_step_context(mode: Any = None) -> Iterator[Any]:
    """FakeTensorMode (``mode``, or a new one) on the CPU with fastpeft's kernels on their CUDA
    allocation path and fresh workspaces."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    nf4_code("cpu"), dynamic_map("cpu")  # cached real constants: make them before fake mode, never inside it
    mode = mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)
    previous = torch.get_default_dtype()
    with isolated_workspaces(), force_backend("triton"), mode:
        try:
            yield mode
        finally:
            torch.set_default_dtype(previous)


@contextlib.contextmanager
def _unpacked_rows() -> Iterator[None]:
    """transformers' packed-sequence detection answering "not packed", as it does for real rows."""
    from unittest import mock

    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        yield
        return
    with mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None):
        yield


@contextlib.contextmanager
def real_step_context() -> Iterator[None]:
    """The same step on real CPU tensors (to check the ledger): fresh workspaces, and the CUDA
    allocation path of our kernels where Triton's interpreter can run it (``TRITON_INTERPRET=1``)."""
    from fastpeft.kernels.backend import interpreting

    torch.manual_seed(0)
    nf4_code("cpu"), dynamic_map("cpu")  # made before the step, as in the fake run
    with isolated_workspaces(), force_backend("triton") if interpreting() else contextlib.nullcontext():
        yield


def _build_model(spec: LedgerSpec) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastpeft.training.model_setup import DTYPES, apply_finetune_mode

    values = dict(spec.model_config)
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    dtype = DTYPES[spec.dtype]
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if spec.stack == "hf_peft":
        from fastpeft.training.ledger_baseline import build_hf_peft_model

        return build_hf_peft_model(model, spec.method, spec.lora_r, spec.lora_alpha)
    lora = {"r": spec.lora_r, "lora_alpha": spec.lora_alpha}
    if spec.method == "qlora":
        lora["compute_dtype"] = spec.dtype
    apply_finetune_mode(model, spec.method, lora)
    apply_step_design(model, spec.design)
    return model.train()


def _phase_on_call(module: nn.Module, tracker: MemoryTracker, phase: str) -> Any:
    return module.register_forward_pre_hook(lambda *_: tracker.set_phase(phase))


# Inside reusing_models(): the last fake model built, by everything but the batch shape. A length
# search measures one model at many lengths, and building an 8B model on fake tensors costs more
# than its step. None outside the block, so no fake model outlives the search.
_REUSED: dict[str, tuple[Any, nn.Module]] | None = None


@contextlib.contextmanager
def reusing_models() -> Iterator[None]:
    """Let :func:`measure_step` reuse its last fake model for specs that differ only in the batch shape."""
    global _REUSED
    previous, _REUSED = _REUSED, {}
    try:
        yield
    finally:
        _REUSED = previous


def _model_key(spec: LedgerSpec) -> str:
    fields = dataclasses.asdict(spec)
    fields.pop("seq_len"), fields.pop("batch_size")
    return json.dumps(fields, sort_keys=True, default=str)


def measure_step(spec: LedgerSpec, detail: bool = False, fake: bool = True) -> LedgerResult:
    """Peak device bytes of one steady-state training step of ``spec``, by category (see the module
    docstring). ``fake=False`` runs the step on real CPU tensors instead (small models: tests);
    ``detail=True`` lists the storages alive at the peak in ``meta["peak_storages"]``."""
    cache = _REUSED if fake else None
    key = _model_key(spec)
    mode, model = cache.pop(key, (None, None)) if cache is not None else (None, None)
    if cache is not None:
        cache.clear()
    with fake_step_context(mode) if fake else real_step_context() as mode:
        model = model if model is not None else _build_model(spec)
        if cache is not None:
            cache[key] = (mode, model)
        return _run_step(spec, model, detail)


@contextlib.contextmanager
def steady_state(tracker: MemoryTracker, model: nn.Module) -> Iterator[tuple[torch.optim.Optimizer, list[Any]]]:
    """``tracker`` running (with CUDA's attention rules) on ``model`` as every step after the first
    finds it: weights, adapters and their AdamW (``foreach``) state resident, gradients relabelled as
    trainable when accumulated. Yields ``(optimizer, hooks)`` in the ``forward`` phase (the caller may
    add hooks); afterwards no hooks and no gradients are left on the model (it may measure again)."""
    tracker.register_module(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    hooks: list[Any] = []
    try:
        with tracker, cuda_attention_rules(), _unpacked_rows():
            tracker.set_phase("optimizer")  # the state every later step starts with
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            hooks += tracker.watch_grads(params)
            tracker.set_phase("forward")
            yield optimizer, hooks
    finally:
        for hook in hooks:
            hook.remove()
        optimizer.zero_grad(set_to_none=True)


def _run_step(spec: LedgerSpec, model: nn.Module, detail: bool) -> LedgerResult:
    tracker = MemoryTracker(detail)
    vocab = model.get_input_embeddings().num_embeddings
    with steady_state(tracker, model) as (optimizer, hooks):
        ids = torch.randint(0, vocab, (spec.batch_size, spec.seq_len))
        if spec.stack == "hf_peft":
            from fastpeft.training.ledger_baseline import hf_loss

            hooks.append(_phase_on_call(model.get_output_embeddings(), tracker, "loss"))
            loss = hf_loss(model, ids)
        else:
            positions = torch.arange(spec.seq_len).expand(spec.batch_size, -1)
            hidden = model.base_model(input_ids=ids, position_ids=positions, use_cache=False)[0][:, :-1]
            tracker.set_phase("loss")
            loss = linear_cross_entropy(hidden, model.get_output_embeddings().weight, ids[:, 1:], reduction="mean")
            del hidden
        tracker.set_phase("backward")
        loss.backward()
        del loss
        tracker.set_phase("optimizer")
        optimizer.step()
    result = tracker.result(
        notes_for(spec),
        seq_len=spec.seq_len,
        batch_size=spec.batch_size,
        method=spec.method,
        stack=spec.stack,
        design=dataclasses.asdict(spec.design),
    )
    if detail:
        result.meta["peak_storages"] = tracker.peak_storages
    return result
