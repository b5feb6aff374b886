"""torch.compile of transformers models carrying fastpeft LoRA / QLoRA layers (inject): no graph
break of ours, and inductor's compiled forward and backward equal eager in fp32."""

from __future__ import annotations

import pytest
import torch

import fastpeft

KINDS = {"lora": {}, "qlora": {"quantize": "nf4"}}


def _adapted(lm, kind: str, num_layers: int = 2) -> torch.nn.Module:
    model = lm.build("llama", num_layers=num_layers, intermediate_size=128)
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **KINDS[kind])
    fastpeft.inject(model, config)
    lm.randomize(model, seed=1)  # B != 0, so the adapters change the output and get gradients
    return model.train()


def _graph_breaks(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    return explanation.graph_break_count, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]


def test_no_graph_break_caused_by_fastpeft(lm):
    ids = lm.ids(seq=9)
    plain, _ = _graph_breaks(lm.build("llama", intermediate_size=128).train(), ids)
    for kind in KINDS:
        breaks, reasons = _graph_breaks(_adapted(lm, kind), ids)
        assert breaks == plain, (kind, reasons)  # as the same model without adapters: 0 with transformers 5.24


def _eager_and_compiled(model: torch.nn.Module, ids: torch.Tensor):
    """(logits, adapter gradients) of one fp32 forward + backward, eager and under inductor."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(fn):
        logits = fn(input_ids=ids).logits.float()
        logits.square().mean().backward()
        grads = [p.grad.float().clone() for p in trainable]
        for p in trainable:
            p.grad = None
        return logits.detach(), grads

    eager = step(model)
    torch._dynamo.reset()
    return eager, step(torch.compile(model, backend="inductor", fullgraph=True))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_inductor_forward_and_backward_match_eager(lm, kind):
    model = _adapted(lm, kind, num_layers=1)  # one block: inductor's C++ compile is what takes time
    (want, want_grads), (got, got_grads) = _eager_and_compiled(model, lm.ids(seq=9))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(got_grads) == 2 * 7  # A and B of all 7 projections
    for g, w in zip(got_grads, want_grads):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_inductor_on_cuda_traces_the_triton_kernels(lm, kind):
    """On a GPU the ops' Triton launches are traced (wrap_triton) into inductor's graph; bf16 step."""
    model = _adapted(lm, kind).to(device="cuda", dtype=torch.bfloat16)
    ids = lm.ids(seq=33).cuda()  # M = 66 rows: the training path; decode rows are checked in tests/kernels
    (want, want_grads), (got, got_grads) = _eager_and_compiled(model, ids)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=3e-2 * max(1.0, w.abs().max().item()), rtol=5e-2)


# The CPU NF4 path (kernels/nf4_cpu.py) calls bitsandbytes' C kernels through ctypes: bf16 decode
# rows take its GEMV, everything else its dequantization into the workspace. Eager calls run them;
# a trace (torch.compile decomposes the ops into their bodies, the ledger runs fake tensors) takes
# the torch reference instead, so neither breaks a graph nor hands a traced tensor to C.
CPU_PATHS = {
    "bf16 decode (GEMV)": (torch.bfloat16, "_gemv"),
    "fp32 training (dequant)": (torch.float32, "_dequant_native_blocks"),
}


def _spy(monkeypatch, name: str) -> list[int]:
    from fastpeft.kernels import nf4_cpu

    calls: list[int] = []
    real = getattr(nf4_cpu, name)
    monkeypatch.setattr(nf4_cpu, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("path", CPU_PATHS)
def test_qlora_cpu_path_compiles_without_graph_breaks_and_runs_natively(lm, monkeypatch, path):
    dtype, native_call = CPU_PATHS[path]
    model = _adapted(lm, "qlora", num_layers=1).to(dtype)  # hidden 64, MLP 128: the GEMV's shapes
    ids = lm.ids(batch=1, seq=3)  # 3 rows: decode-sized
    calls = _spy(monkeypatch, native_call)
    breaks, reasons = _graph_breaks(model, ids)
    assert breaks == 0, reasons
    want = model(input_ids=ids).logits
    eager_calls = len(calls)
    assert eager_calls > 0  # the eager step takes bitsandbytes' kernel
    torch._dynamo.reset()
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids).logits
    assert len(calls) == eager_calls  # the compiled graph traced the reference
    if dtype == torch.float32:  # the native dequantization is bit for bit the reference
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    else:  # the GEMV rounds the block scales to bf16
        torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=3e-2)
        assert not torch.equal(got, want)  # (so the eager logits did come from the GEMV)


def test_qlora_cpu_path_under_fake_tensor_mode(lm, monkeypatch):
    """The memory ledger's setting: a QLoRA model built and stepped on fake tensors; no native call
    is made, nothing derived from a weight is cached, no fake NF4 view stays on a layer."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from fastpeft.kernels import nf4, nf4_cpu
    from fastpeft.kernels.workspace import isolated_workspaces
    from fastpeft.qlora_linear import QLoRALinear

    def refuse(*args, **kwargs):
        raise AssertionError("bitsandbytes' C kernel called on a traced tensor")

    for name in ("_gemv", "_dequant_native_blocks", "_absmax_native"):
        monkeypatch.setattr(nf4_cpu, name, refuse)
    nf4_cpu.clear_derived()
    nf4.nf4_code("cpu"), nf4.dynamic_map("cpu")  # cached real constants, made outside the fake mode
    default = torch.get_default_dtype()
    for dtype, rows in ((torch.float32, 9), (torch.bfloat16, 3)):  # training path, GEMV-sized rows
        with isolated_workspaces(), FakeTensorMode(allow_non_fake_inputs=True):
            try:
                torch.set_default_dtype(dtype)  # built in dtype: .to() cannot swap fake parameters
                model = _adapted(lm, "qlora", num_layers=1)
            finally:
                torch.set_default_dtype(default)
            logits = model(input_ids=lm.ids(batch=1, seq=rows)).logits
            logits.float().square().mean().backward()
        assert isinstance(logits, FakeTensor) and logits.shape == (1, rows, 128) and logits.dtype == dtype
        layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
        assert len(layers) == 7 and all("_nf4_view" not in layer.__dict__ for layer in layers)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not nf4_cpu._derived
