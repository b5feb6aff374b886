#!/usr/bin/env bash
# One GPU check, ready before a GPU comes: on one H100/H200 in at most 8 minutes it
#   1. checks every kernel on CUDA against its reference at real shapes (pytest -m gpu),
#   2. runs every `fastpeft bench` scenario with counts sized to fit (records results/*.json),
#   3. compares the memory ledger with torch.cuda.max_memory_allocated (within 10%),
#   4. times the 8B step with and without offloaded checkpointing (at most 10% slower),
#   5. regenerates benchmarks/RESULTS.md,
# and writes everything (logs, JSON, PNG, RESULTS.md, summary.txt) under $OUT when set.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the same steps at tiny sizes on a CPU (CI runs this)
#
# On the GPU machine (torch 2.11, no bitsandbytes): wheels carried in .whl/ are installed first.
# Each step has its own time limit so the whole check ends within budget; a step that fails or
# runs out of time is reported in summary.txt and the check goes on.
set -uo pipefail

SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d -t fastpeft-gpu-check-XXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, note the outcome
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local outcome="ok"
    if [[ $rc == 124 || $rc == 137 ]]; then outcome="TIMEOUT after ${limit}s"; FAILED=1
    elif [[ $rc != 0 ]]; then outcome="FAILED (exit $rc)"; FAILED=1; fi
    printf '%-16s %-26s %4ds  (log: %s.log)\n' "$name" "$outcome" $((SECONDS - start)) "$name" | tee -a "$SUMMARY"
}

if [[ $SMOKE == 0 ]]; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        step wheels 120 bash -c "$PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl"
        export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
    fi
    step install 60 $PY -m pip install -q --no-build-isolation --no-deps -e .
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
        | tee -a "$SUMMARY" || exit 1
    RESULTS=benchmarks/results
    BENCH=(--reps 5)
    KERNELS="decode-linear train-linear prefix-attention sampling multi-adapter"  # cpu-* are CPU-only scenarios
    LIMIT_TESTS=60; LIMIT_BENCH=120; LIMIT_STEP=90; LIMIT_MEMORY=90  # with install: under 8 minutes
else
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    RESULTS="$OUT/results"
    BENCH=(--small --reps 1 --no-plots --record-cpu --results-dir "$RESULTS" --results-md "$OUT/RESULTS.md")
    KERNELS="decode-linear --filter M=1"  # one case: the scenarios' own CPU tests (benchmarks/) cover the rest
    LIMIT_TESTS=120; LIMIT_BENCH=240; LIMIT_STEP=120; LIMIT_MEMORY=120
fi
FASTPEFT=("$PY" -m fastpeft)

# 1. kernels on CUDA against their references at real shapes (skipped, but collected, on a CPU)
TESTS="tests/kernels tests/fastpeft tests/training"
[[ $SMOKE == 1 ]] && TESTS="tests/kernels"
step kernel-tests $LIMIT_TESTS "$PY" -m pytest -q -m gpu -p no:cacheprovider $TESTS

# 2. every bench scenario; qlora-step at its 2048-token cases (the 2x throughput targets); lora-step and
#    trl-sft-step (patched PeftModel vs PEFT, compile off/on) on the GPU only
step bench-kernels $LIMIT_BENCH "${FASTPEFT[@]}" bench $KERNELS "${BENCH[@]}"
if [[ $SMOKE == 0 ]]; then
    step bench-qlora $LIMIT_STEP "${FASTPEFT[@]}" bench qlora-step --filter seq=2048 "${BENCH[@]}"
else
    step bench-qlora $LIMIT_STEP "${FASTPEFT[@]}" bench qlora-step "${BENCH[@]}"
fi
step bench-memory $LIMIT_MEMORY "${FASTPEFT[@]}" bench memory "${BENCH[@]}"
if [[ $SMOKE == 0 ]]; then  # the whole-step scenarios' CPU smoke runs are their own tests in benchmarks/
    step bench-lora 60 "${FASTPEFT[@]}" bench lora-step "${BENCH[@]}"
    if "$PY" -c "import trl" 2> /dev/null; then  # TRL only when its wheel was carried
        step bench-trl 120 "${FASTPEFT[@]}" bench trl-sft-step --reps 3
    else
        echo "bench-trl        skipped: trl is not installed (carry its wheel in .whl/)" | tee -a "$SUMMARY"
    fi
fi

# 3 and 4: the ledger against the measured peak; offloading's cost in time
step ledger-check 120 "$PY" - "$RESULTS" "$SMOKE" <<'PY'
import json, sys
from pathlib import Path
results, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
if smoke:  # no GPU: the same tracker on real CPU tensors must give the ledger's peak
    from fastpeft.training.ledger_step import LedgerSpec, measure_step
    from fastpeft.training.step_design import StepDesign
    cfg = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=64)
    spec = LedgerSpec(cfg, seq_len=48, method="lora", design=StepDesign.long_context())
    fake, real = measure_step(spec).peak_bytes, measure_step(spec, fake=False).peak_bytes
    print(f"tiny lora step: ledger {fake} B, real CPU tensors {real} B")
    sys.exit(0 if fake == real else 1)
rows = [r for p in sorted(results.glob("*.json")) for r in json.loads(p.read_text()).get("rows", [])
        if r.get("scenario") == "memory" and r.get("impl", "").startswith("ours: measured")]
bad = 0
for r in rows:
    ratio = r["extra"].get("measured_over_ledger")
    ok = ratio is not None and 0.9 <= ratio <= 1.1
    bad += not ok
    print(f"{r['group']} seq={r['x']}: measured {r['peak_mem_bytes'] / 2**30:.2f} GiB, ledger "
          f"{r['extra'].get('ledger_peak_bytes', 0) / 2**30:.2f} GiB, ratio {ratio} {'ok' if ok else 'OUTSIDE 10%'}")
sys.exit(1 if bad or not rows else 0)
PY
step offload-speed 60 "$PY" - "$SMOKE" "$OUT" <<'PY'
import json, sys
from fastpeft.cli.bench import load_benchmarks
load_benchmarks()
from fastpeft_benchmarks.training_steps import run_training_steps
smoke = sys.argv[1] == "1"
size = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64) if smoke else dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
seq, device = (64, "cpu") if smoke else (8192, "cuda")
out = {}
for name, design in (("checkpointing", {}), ("offloaded", {"offload_activations": True})):
    r = run_training_steps(size, steps=2, warmup_steps=1, seq_len=seq, device=device, design=design)
    out[name] = {"tokens_per_s": r["tokens_per_s"], "peak_memory_bytes": r["peak_memory_bytes"]}
    print(name, out[name])
slower = out["checkpointing"]["tokens_per_s"] / out["offloaded"]["tokens_per_s"] - 1
print(f"offloading is {100 * slower:.1f}% slower (target: at most 10%)")
(__import__("pathlib").Path(sys.argv[2]) / "offload_speed.json").write_text(json.dumps({**out, "slower": slower}))
sys.exit(0 if smoke or slower <= 0.10 else 1)
PY

# 5. RESULTS.md from every recorded result (GPU runs were recorded by the bench steps)
if [[ $SMOKE == 0 ]]; then
    step results-md 60 "${FASTPEFT[@]}" bench --regenerate
    mkdir -p "$OUT/results" && cp -r benchmarks/results/. "$OUT/results/" && cp benchmarks/RESULTS.md "$OUT/"
else
    step ledger-smoke 120 "${FASTPEFT[@]}" bench --ledger --small --out "$OUT"
    step results-md 60 "${FASTPEFT[@]}" bench --regenerate --results-dir "$RESULTS" --results-md "$OUT/RESULTS.md"
fi
echo "outputs in $OUT" | tee -a "$SUMMARY"
exit $FAILED
