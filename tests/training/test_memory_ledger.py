"""The memory ledger: the same tracker on real and fake tensors, its categories, CUDA's attention rules."""

from __future__ import annotations

import pytest
import torch

from fastpeft.training.ledger_baseline import nf4_nbytes
from fastpeft.training.ledger_step import LedgerSpec, measure_step
from fastpeft.training.memory_ledger import CATEGORIES, MemoryTracker, cuda_sdpa_backend, format_ledger_table
from fastpeft.training.step_design import StepDesign

TINY = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
)


@pytest.mark.parametrize(
    ("stack", "method", "design"),
    [
        ("hf_peft", "qlora", StepDesign()),
        ("fastpeft", "lora", StepDesign(offload_activations=True, mlp_tile_rows=24, lean_norms=True)),
        ("fastpeft", "full", StepDesign()),
    ],
    ids=["hf-peft-qlora", "fastpeft-lora-long-context", "fastpeft-full"],
)
def test_real_and_fake_tensors_give_the_same_peak(stack, method, design):
    # one tracker, one step; only the tensors differ. 70 rows over 24-row MLP tiles and 2048-row
    # norm chunks: the fake run skips repeated tiles (kernels.backend.tile_starts), the real one runs them
    spec = LedgerSpec(TINY, seq_len=35, batch_size=2, method=method, stack=stack, design=design)
    fake, real = measure_step(spec), measure_step(spec, fake=False)
    assert real.peak_bytes > 0
    assert fake.peak_bytes == real.peak_bytes
    assert fake.peak_by_category == real.peak_by_category
    assert fake.host_peak_bytes == real.host_peak_bytes


@pytest.mark.triton
def test_real_and_fake_agree_through_the_nf4_workspace_path():
    # QLoRA on real tensors runs our Triton kernels in the interpreter; the interpreter makes a
    # 64-byte tensor for the NF4 code table while a kernel runs, which a GPU launch does not
    spec = LedgerSpec(TINY, seq_len=33, batch_size=1, method="qlora")
    fake, real = measure_step(spec), measure_step(spec, fake=False)
    assert 0 <= real.peak_bytes - fake.peak_bytes <= 64
    assert fake.peak_by_category["workspace"] == real.peak_by_category["workspace"] > 0


def _frozen_storage_bytes(model: torch.nn.Module) -> int:
    storages = {
        id(t.untyped_storage()): t.untyped_storage().nbytes()
        for t in (*model.parameters(), *model.buffers())
        if not t.requires_grad
    }
    return sum(storages.values())


def test_categories_add_up_and_weights_are_the_model_bytes():
    import transformers

    import fastpeft

    result = measure_step(LedgerSpec(TINY, seq_len=40, method="qlora"))
    assert sum(result.peak_by_category.values()) == result.peak_bytes
    assert set(result.peak_by_category) == set(CATEGORIES)
    # the same model built for real: NF4 block linears (double quant), bf16 embeddings, head, norms
    config = {k: v for k, v in TINY.items() if k != "model_type"}
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config), dtype=torch.bfloat16)
    fastpeft.inject(
        model,
        fastpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", quantize="nf4", compute_dtype="bfloat16"),
    )
    assert result.peak_by_category["weights"] == _frozen_storage_bytes(model)
    assert result.peak_by_category["trainable"] > 0 and result.peak_by_category["workspace"] > 0


def test_baseline_counts_bitsandbytes_nf4_bytes_and_fp32_upcasts():
    result = measure_step(LedgerSpec(TINY, seq_len=40, stack="hf_peft"))
    h, f, layers, v = 32, 80, 2, 96
    block = [h * h, h * 16, h * 16, h * h, h * f, h * f, f * h]  # kv dim = 2 heads x 8
    nf4 = layers * sum(nf4_nbytes(n) for n in block)  # transformers' default: no double quantization
    fp32 = 4 * (2 * v * h + (2 * layers + 1) * h)  # prepare_model_for_kbit_training casts the rest to fp32
    rotary = 2 * 4 * 4  # inv_freq and original_inv_freq, fp32 [head_dim / 2]
    assert result.peak_by_category["weights"] == nf4 + fp32 + rotary
    assert any("bitsandbytes ops do not run on FakeTensors" in n for n in result.notes)


def test_tracker_relabels_and_frees():
    tracker = MemoryTracker()
    w = torch.zeros(10, dtype=torch.float32)
    tracker.register(w, "weights")
    with tracker:
        tracker.set_phase("forward")
        a = torch.ones(100)  # 400 bytes of activations
        b = a * 2
        tracker.set_phase("loss")
        c = b.sum()
        del a, b
        tracker.set_phase("backward")
        d = torch.ones(25)
    assert tracker.peak == 40 + 800 + 4  # a, b and the sum alive together
    assert tracker.peak_by_category["activations"] == 800 and tracker.peak_phase == "loss"
    assert tracker.current == {**dict.fromkeys(CATEGORIES, 0), "weights": 40, "loss": 4, "backward": 100}
    tracker.register(d, "trainable")  # a gradient assigned to .grad
    assert tracker.current["backward"] == 0 and tracker.current["trainable"] == 100
    del c, d
    assert tracker.total == 40
    with pytest.raises(ValueError, match="category"):
        tracker.register(w, "everything")
    with pytest.raises(ValueError, match="phase"):
        tracker.set_phase("lunch")


def test_cuda_attention_rules():
    q16 = torch.empty(1, 8, 4, 64, dtype=torch.bfloat16)
    k16 = torch.empty(1, 2, 4, 64, dtype=torch.bfloat16)
    q32, k32 = q16.float(), k16.float()
    assert cuda_sdpa_backend(q16, k16, k16, is_causal=True, enable_gqa=True) == "flash"
    assert cuda_sdpa_backend(q32, q32, q32, is_causal=True) == "efficient"
    assert cuda_sdpa_backend(q32, k32, k32, is_causal=True, enable_gqa=True) == "math"  # the HF baseline
    mask = torch.ones(4, 4, dtype=torch.bool)
    assert cuda_sdpa_backend(q16, q16, q16, attn_mask=mask) == "efficient"
    assert cuda_sdpa_backend(q16, k16, k16, attn_mask=mask, enable_gqa=True) == "math"


def test_fp32_grouped_query_attention_is_counted_as_the_math_kernel():
    # the HF baseline computes attention in fp32 with 2 KV heads for 4: on CUDA that is the math
    # backend, which saves [B, H, T, T] probabilities; the CPU flash kernel would not
    spec = LedgerSpec(TINY, seq_len=256, stack="hf_peft")
    scores = 4 * 256 * 256 * 4  # one fp32 [1, 4, T, T]
    result = measure_step(spec)
    assert result.peak_by_category["backward"] >= 2 * scores


def test_ledger_spec_rejects_bad_input():
    with pytest.raises(ValueError, match="stack"):
        LedgerSpec(TINY, stack="deepspeed")
    with pytest.raises(ValueError, match="method"):
        LedgerSpec(TINY, stack="hf_peft", method="full")
    with pytest.raises(ValueError, match="seq_len"):
        LedgerSpec(TINY, seq_len=1)
    with pytest.raises(ValueError, match="model_type"):
        LedgerSpec({"hidden_size": 8})
    with pytest.raises(ValueError, match="mlp_tile_rows"):
        StepDesign(mlp_tile_rows=0)


def test_format_table_lists_every_category():
    a = measure_step(LedgerSpec(TINY, seq_len=24))
    table = format_ledger_table({"fastpeft": a, "again": a})
    assert table.count("\n") == len(CATEGORIES) + 4 and "| fastpeft | again |" in table


def test_a_reused_fake_model_measures_the_same():
    # a length search builds the model once and measures it at many lengths
    from fastpeft.training import ledger_step

    spec = LedgerSpec(TINY, seq_len=40, design=StepDesign.long_context())
    first = measure_step(spec)
    with ledger_step.reusing_models():
        measure_step(LedgerSpec(TINY, seq_len=90, design=StepDesign.long_context()))
        again = measure_step(spec)
        assert len(ledger_step._REUSED) == 1
    assert again.peak_bytes == first.peak_bytes and again.peak_by_category == first.peak_by_category
    assert ledger_step._REUSED is None  # no fake model outlives the block


def test_fake_implementations_report_workspaces_and_transients():
    # a register_fake runs below the ledger's dispatch mode: it reports what the real op holds
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastpeft.kernels import workspace

    lib = torch.library.Library("ledger_test", "FRAGMENT")
    lib.define("scaled(Tensor x) -> Tensor")

    def fake(x):
        if workspace.accounting():
            workspace.get_workspace("ledger_test_ws", 1000, torch.float32, x.device)  # 4000 bytes, kept
            workspace.note_transient(10_000)  # freed inside the real op
        return torch.empty_like(x)

    torch.library.register_fake("ledger_test::scaled", fake, lib=lib)
    traced = []
    with FakeTensorMode(), workspace.isolated_workspaces():
        x = torch.empty(100)  # 400 bytes
        torch.ops.ledger_test.scaled(x)  # no ledger: nothing allocated beyond the output
        assert not workspace.accounting()
        tracker = MemoryTracker()
        with tracker:
            tracker.set_phase("forward")
            y = torch.ops.ledger_test.scaled(x)
            traced.append(y)
        assert tracker.current["workspace"] == 4000 and tracker.current["activations"] == 400
    assert tracker.peak == 4000 + 400 + 10_000  # the transient on top of the op's output
