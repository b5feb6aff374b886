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
