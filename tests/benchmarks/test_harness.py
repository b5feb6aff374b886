"""The benchmark harness: every scenario end to end on CPU, bad names, missing baselines, formulas."""

import contextlib
import json
import sys

import pytest
import torch

from fastpeft import cli
from fastpeft.cli import bench as cli_bench
from fastpeft.kernels.nf4 import quantize_nf4

cli_bench.load_benchmarks()

from fastpeft_benchmarks import baselines, formulas, harness, report, runner, scenarios  # noqa: E402
from fastpeft_benchmarks.scenarios import decode_linear  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VERSIONED = {"torch", "triton", "transformers", "bitsandbytes", "peft"}


def test_every_scenario_runs_small_on_cpu_and_writes_json_table_png_results_md(tmp_path):
    lines = []
    run = runner.run_bench(
        None,
        device="cpu",
        small=True,
        results_dir=tmp_path / "results",
        results_md=tmp_path / "RESULTS.md",
        record_cpu=True,
        cpu_reps=1,
        strict=True,
        log=lines.append,
    )
    result = json.loads(run.json_path.read_text())
    assert run.json_path.parent == tmp_path / "results"
    assert result["device"]["type"] == "cpu" and set(result["versions"]) == VERSIONED
    assert result["date"] and "commit" in result["git"] and result["floors"] is None
    rows = result["rows"]
    assert {r["scenario"] for r in rows} == set(scenarios.SCENARIOS)
    for r in rows:
        if r["scenario"] == "memory":  # the memory ledger: peak bytes of a fake-tensor step, no time
            assert r["status"] == "ok" and r["peak_mem_bytes"] > 0 and r["median_ms"] is None, r
        elif r["role"] == harness.BASELINE:  # every baseline is installed here
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["vs_floor"] is None  # no floor on CPU
            assert r["vs_fastest_baseline"] is not None or not r["comparable"]
            assert (r["tflops"] or r["gbps"]) > 0
        elif r["scenario"] in ("decode-linear", "train-linear", "prefix-attention", "multi-adapter"):
            assert r["status"] == "ok" and r["backend"] == "torch", r
            assert 0 < r["rel_err"] <= r["tolerance"]  # the check ran against the float64 reference
        elif r["scenario"].startswith("cpu-"):  # interleaved rounds against the baselines (interleaved.py)
            assert r["status"] == "ok" and r["extra"]["speedup"] > 0 and r["extra"]["rounds"] == 1, r
            assert r["rel_err"] is None or r["rel_err"] <= r["tolerance"]
        else:  # whole workloads, measured by benchmarks/training_steps.py and sampling_throughput.py
            assert r["status"] == "ok" and r["extra"]["tokens_per_s"] > 0, r
    for name in scenarios.SCENARIOS:
        png = tmp_path / "results" / f"{run.json_path.stem}-{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"== {name} ==" in run.table
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.startswith(report.RESULTS_HEADER) and "No GPU run has been recorded yet" in md
    assert f"results/{run.json_path.stem}-decode-linear.png" in md and "### sampling" in md
    assert any("RESULTS.md regenerated" in line for line in lines)


def test_cpu_run_without_record_flag_leaves_results_md_alone(tmp_path):
    md = tmp_path / "RESULTS.md"
    run = runner.run_bench(
        ["decode-linear"],
        device="cpu",
        small=True,
        out_dir=tmp_path / "out",
        results_dir=tmp_path / "results",
        results_md=md,
        plots=False,
        cpu_reps=1,
        case_filter="M=1",
        log=lambda _: None,
    )
    assert run.results_md is None and not md.exists() and not (tmp_path / "results").exists()
    assert run.json_path.parent == tmp_path / "out"
    assert {r["x"] for r in run.result["rows"]} == {1}


def test_bad_scenario_name_is_a_clear_error(capsys):
    with pytest.raises(scenarios.UnknownScenario, match=r"unknown scenario 'decode'.*decode-linear"):
        runner.run_bench(["decode"], device="cpu")
    assert cli.main(["bench", "decode-linear", "no-such-thing"]) == 2
    err = capsys.readouterr().err
    assert "unknown scenario 'no-such-thing'" in err and "prefix-attention" in err and "Traceback" not in err


def test_missing_benchmarks_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="benchmark harness was not found"):
        cli_bench.load_benchmarks(tmp_path)
    monkeypatch.setattr(cli_bench, "benchmarks_dir", lambda: tmp_path / "benchmarks")
    assert cli_bench.main([]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_missing_baseline_gives_a_not_installed_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    ctx = harness.Context(device=torch.device("cpu"), small=True, cpu_reps=1, strict=True)
    case = decode_linear.cases(small=True)[0]
    rows = {r.impl: r for r in harness.run_case(case, ctx)}
    assert rows["bnb NF4 + LoRA (unfused)"].status == "not installed: bitsandbytes"
    assert rows["bnb NF4 + LoRA (unfused)"].median_ms is None
    assert rows["ours (fused NF4 + LoRA)"].status == "ok" and rows["dense bf16 + LoRA (unfused)"].status == "ok"
    assert rows["ours (fused NF4 + LoRA)"].vs_fastest_baseline is not None
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(harness.Unavailable, match="not installed: bitsandbytes"):
        baselines.hf_bnb_peft_model("unused", torch.device("cpu"), training=True)


def test_implementation_errors_become_rows_unless_strict():
    def broken() -> harness.Prepared:
        raise RuntimeError("kernel exploded\nsecond line")

    case = harness.Case(scenario="s", group="g", x_name="M", x=1, make_impls=lambda ctx: [], metric="GB/s")
    spec = harness.ImplSpec("x", harness.OURS, broken)
    ctx = harness.Context(device=torch.device("cpu"), small=True)
    assert harness.run_impl(case, spec, ctx).status == "error: RuntimeError: kernel exploded"
    ctx.strict = True
    with pytest.raises(RuntimeError, match="kernel exploded"):
        harness.run_impl(case, spec, ctx)


def test_lora_linear_formulas_by_hand():
    # m=2 k=3 n=5 r=1: fwd 2·2·3·5 + 2·2·1·(3+5) = 60 + 32; bwd adds 2·2·5·3 + 4·2·1·8 = 60 + 64
    assert formulas.lora_linear_flops(2, 3, 5, 1) == 92
    assert formulas.lora_linear_flops(2, 3, 5, 1, backward=True) == 216
    assert formulas.base_gemm_flops(2, 3, 5, backward=True) == 120
    # bytes: weight 100 + 2·(2·3 + 2·5 + 1·3 + 5·1) = 100 + 48
    assert formulas.lora_linear_bytes(2, 3, 5, 1, weight_bytes=100) == 148


@pytest.mark.parametrize("shape", [(64, 64), (33, 70), (1, 257), (300, 300)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_match_the_real_weight(shape, double_quant):
    w = torch.randn(*shape)
    assert formulas.nf4_weight_bytes(shape[1], shape[0], 64, double_quant) == quantize_nf4(w, 64, double_quant).nbytes


def test_nf4_bytes_and_floors_by_hand():
    # 64×64: 2048 packed bytes + 64 blocks × 4 (fp32 absmax); double quant: 64 codes + 4 + 1024 + 4
    assert formulas.nf4_weight_bytes(64, 64, 64, double_quant=False) == 2048 + 256
    assert formulas.nf4_weight_bytes(64, 64, 64, double_quant=True) == 2048 + 64 + 4 + 1024 + 4
    floors = {"copy_GBps": 3020.0, "gemm_TFLOPs": 687.0}  # an H100's measured copy bandwidth and bf16 GEMM rate
    # HBM floor of a 4096→4096 NF4 weight: (K·N/2 + K·N/64·4) bytes at 3.02 TB/s = 3.1 µs
    hbm = harness.floor_ms(("hbm", formulas.nf4_weight_bytes(4096, 4096, 64, double_quant=False)), floors)
    assert hbm == pytest.approx(9437184 / 3.02e12 * 1e3) and round(hbm * 1e3, 1) == 3.1
    # GEMM floor of M 8192, 4096→4096, fwd + bwd: 2 GEMMs (2·M·K·N FLOPs each) at 687 TFLOP/s ≈ 0.80 ms
    gemm = harness.floor_ms(("gemm", formulas.base_gemm_flops(8192, 4096, 4096, backward=True)), floors)
    assert round(gemm, 2) == 0.80
    assert harness.floor_ms(("gemm", 1.0), None) is None


def test_attention_formulas_by_hand():
    # t=4 causal: 4·5/2 = 10 pairs, plus 4 queries × 2 prefix keys = 8
    assert formulas.attention_pairs(4, 2) == 18
    assert formulas.attention_flops(1, 1, 4, 2, 8) == 18 * 4 * 8
    assert formulas.attention_flops(3, 2, 4, 2, 8, backward=True) == 3 * 2 * 18 * 14 * 8


def test_llama_formulas_by_hand():
    dims = dict(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, vocab=10)
    # projections (in·out): q 16, k 8, v 8, o 16, gate 32, up 32, down 32 = 144; + lm_head 40 -> 184
    # LoRA r=1 (in+out): 8 + 6 + 6 + 8 + 12 + 12 + 12 = 64; tokens 2 -> 2·(4·184 + 6·64) = 2240
    # attention: head dim 2, 3 pairs, 2 heads: 2·3·14·2 = 168
    assert formulas.llama_qlora_step_flops(**dims, batch=1, seq=2, r=1) == 2240 + 168
    # NF4 bytes (blocksize 64, no double quant): 12 + 8 + 8 + 12 + 20·3 = 100; LoRA bf16 2·64 = 128;
    # lm_head bf16 2·10·4 = 80
    assert formulas.llama_decode_step_bytes(**dims, r=1) == 100 + 128 + 80


def test_rates_and_ratios_by_hand():
    def row(impl, role, ms, comparable=True):
        return harness.Row(
            scenario="s", group="g", x_name="M", x=1, impl=impl, role=role, median_ms=ms, comparable=comparable
        )

    rows = [
        row("ours", harness.OURS, 1.0),
        row("a", harness.BASELINE, 4.0),
        row("b", harness.BASELINE, 2.0),
        row("other op", harness.BASELINE, 0.5, comparable=False),
    ]
    harness.set_ratios(rows)
    assert [r.vs_fastest_baseline for r in rows] == [0.5, 2.0, 1.0, 0.25]
    r = harness.Row(
        scenario="s",
        group="g",
        x_name="M",
        x=1,
        impl="i",
        role=harness.OURS,
        median_ms=2.0,
        flops=4e12,
        bytes=6e9,
        floor_ms=0.5,
    )
    harness._fill_rates(r)
    assert (r.tflops, r.gbps, r.vs_floor) == (2000.0, 3000.0, 4.0)


def test_interleaved_rounds_alternate_order_and_give_the_ratio_by_round():
    calls = []
    times = harness.interleaved_times(
        {"ours": lambda: calls.append("o"), "base": lambda: calls.append("b")},
        warmup=1,
        rounds=3,
        device=torch.device("cpu"),
    )
    assert calls == ["o", "b", "o", "b", "b", "o", "o", "b"]  # warm-up, then the order flips each round
    assert {k: len(v) for k, v in times.items()} == {"ours": 3, "base": 3} and min(times["ours"]) >= 0
    rows = [
        harness.Row(
            scenario="s",
            group="g",
            x_name="seq",
            x=1,
            impl="ours",
            role=harness.OURS,
            median_ms=3.0,
            extra={"vs_baseline_interleaved": 0.9},
        ),
        harness.Row(scenario="s", group="g", x_name="seq", x=1, impl="b", role=harness.BASELINE, median_ms=2.0),
    ]
    harness.set_ratios(rows)  # the per-round median wins over the quotient of medians (1.5)
    assert [r.vs_fastest_baseline for r in rows] == [0.9, 1.0]
    # whoever runs second is 4% slower: rounds 0, 2 (ours first) and 1, 3 (ours second) pair up
    pairs = harness.paired_round_ratios([1.0, 1.04, 2.0, 2.08, 5.0], [1.04, 1.0, 2.08, 2.0, 1.0])
    assert pairs == pytest.approx([1.0, 1.0])  # the odd last round has no partner


def test_interleaved_turns_repeat_short_calls_and_the_last_round_is_wrapped():
    calls, wrapped = [], []

    @contextlib.contextmanager
    def last_round(name):
        wrapped.append(name)
        yield

    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = harness.interleaved_times(fns, 0, 2, torch.device("cpu"), calls={"a": 3}, last_round=last_round)
    assert calls == ["a", "a", "a", "b", "b", "a", "a", "a"] and wrapped == ["b", "a"]
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}


def test_relative_error_catches_mismatch_and_shape():
    a = torch.tensor([3.0, 4.0])
    assert harness.relative_error([a], [a.double()]) == 0.0
    assert harness.relative_error([torch.tensor([3.0, 5.0])], [a]) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match=r"output shape \(3,\)"):
        harness.relative_error([torch.ones(3)], [a])


def test_results_md_keeps_gpu_runs_newest_first_and_skips_bad_files(tmp_path, capsys):
    results, md = tmp_path / "results", tmp_path / "RESULTS.md"
    results.mkdir()
    row = harness.Row(
        scenario="decode-linear",
        group="4096→4096",
        x_name="M",
        x=1,
        impl="ours",
        role="ours",
        median_ms=0.0123,
        metric="GB/s",
        gbps=700.0,
        vs_floor=4.1,
        rel_err=3e-3,
    ).to_json()
    for date, dev in (("2026-11-20T10:00:00+00:00", "cuda"), ("2026-11-22T09:30:00+00:00", "cuda")):
        result = {
            "schema": report.SCHEMA,
            "date": date,
            "device": {"type": dev, "name": "NVIDIA H100"},
            "versions": {"torch": "2.11.0"},
            "git": {"commit": "abcdef1234567", "dirty": False},
            "floors": {"copy_GBps": 3020.0, "gemm_TFLOPs": 687.0},
            "rows": [row],
            "plots": [],
        }
        report.write_json(result, results, report.result_stem(result))
    (results / "broken.json").write_text("{not json")
    assert cli.main(["bench", "--regenerate", "--results-dir", str(results), "--results-md", str(md)]) == 0
    text = md.read_text()
    assert "No GPU run" not in text and "broken.json" in capsys.readouterr().err
    assert text.index("2026-11-22 09:30") < text.index("2026-11-20 10:00")
    assert "12.3 µs" in text and "700 GB/s" in text and "4.10×" in text and "copy 3020 GB/s" in text
