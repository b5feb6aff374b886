"""The memory planner: parameter counts exact, decisions by the documented flow, and the estimate
within 25% of the measured CPU peak for a small model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastpeft.training.model_setup import build_model
from fastpeft.training.plan import ModelShape, PlanInputs, estimate, plan, recommend

MEASURE = """
import json, re, resource, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
import fastpeft
from fastpeft.training.losses import CausalLMLoss
from fastpeft.training.model_setup import enable_gradient_checkpointing

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

def reset_peak():  # Linux >= 4.0: set the high-water mark VmHWM back to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def run(cfg, mode, ckpt, batch, seq):
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    if mode != "full":
        fastpeft.inject(model, fastpeft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                   quantize="nf4" if mode == "qlora" else None))
    if ckpt:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = CausalLMLoss(model, "fastpeft")
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
    pos, seg = torch.arange(seq).expand(batch, -1), torch.ones_like(ids)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss, n = loss_fn(ids, ids, pos, seg)
        (loss / n).backward()
        opt.step()

cfg, out = {cfg}, {{}}
tiny = dict(cfg, hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=64)
for mode, ckpt in {runs}:  # a tiny run first, so library code pages the step touches are resident
    run(tiny, mode, ckpt, 1, 8)
for mode, ckpt in {runs}:
    reset_peak()
    base = rss()
    run(cfg, mode, ckpt, {batch}, {seq})
    out[mode + ("+ckpt" if ckpt else "")] = peak() - base
print(json.dumps(out))
"""


def test_parameter_counts_are_exact(tiny_llama):
    cfg = tiny_llama(num_hidden_layers=3)
    model = build_model(None, cfg)
    assert ModelShape.from_config(cfg).total_params() == sum(p.numel() for p in model.parameters())
    tied = tiny_llama(tie_word_embeddings=True)
    model = build_model(None, tied)
    assert ModelShape.from_config(tied).total_params() == sum(p.numel() for p in model.parameters())


def test_lora_parameter_count_matches_injection(tiny_llama):
    fastpeft = pytest.importorskip("fastpeft")
    cfg = tiny_llama()
    model = build_model(None, cfg)
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ModelShape.from_config(cfg).lora_params(4) == trainable


def _llama_8b() -> dict:
    return dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )


@pytest.mark.parametrize(
    "gib,data_tokens,seq,want",
    [
        (640.0, 10**10, 2048, "full"),  # fits, lots of data
        (640.0, 10**6, 2048, "lora"),  # fits, but little data: adapters
        (16.0, 10**10, 2048, "qlora"),  # only the 4-bit base fits
        (4.0, 10**6, 8192, None),  # nothing fits
    ],
)
def test_decision_flow(gib, data_tokens, seq, want):
    inputs = PlanInputs(model_config=_llama_8b(), gpu_memory_gib=gib, data_tokens=data_tokens, seq_len=seq)
    result = plan(inputs)
    assert result["recommendation"] == want, result["reason"]
    est = result["estimates"]
    assert est["qlora"]["weights"] < 0.4 * est["lora"]["weights"]  # embeddings and head stay 16-bit
    assert est["full"]["optimizer"] == 8 * est["full"]["trainable_params"]
    for e in est.values():
        assert e["total_ckpt"] < e["total"]


def test_recommend_prefers_checkpointing_only_when_needed():
    shape = ModelShape.from_config(_llama_8b())
    inputs = PlanInputs(model_config=_llama_8b(), gpu_memory_gib=18.0, data_tokens=10**6, seq_len=4096)
    estimates = {m: estimate(inputs, shape, m) for m in ("full", "lora", "qlora")}
    method, ckpt, _ = recommend(inputs, shape, estimates)
    assert method == "qlora" and ckpt  # 4k tokens of activations only fit when recomputed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_estimate_within_25_percent_of_measured_cpu_peak(python_command):
    cfg = dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    )
    batch, seq = 4, 256
    runs = [("qlora", True), ("full", False)]
    argv, env, cwd = python_command(MEASURE.format(cfg=cfg, runs=runs, batch=batch, seq=seq))
    # allocations >= 64 KiB go to mmap and back to the OS when freed, so the RSS peak tracks live
    # tensors instead of what glibc's heap keeps around after earlier frees; the peak is the kernel's
    # high-water mark, reset before each run
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    shape = ModelShape.from_config(cfg)
    inputs = PlanInputs(dtype="float32", seq_len=seq, batch_size=batch, lora_r=16, loss_impl="fastpeft")
    for mode, ckpt in runs:
        e = estimate(inputs, shape, mode)
        predicted = e["total_ckpt"] if ckpt else e["total"]
        got = measured[mode + ("+ckpt" if ckpt else "")]
        assert 0.75 <= got / predicted <= 1.25, (mode, ckpt, got, predicted)
