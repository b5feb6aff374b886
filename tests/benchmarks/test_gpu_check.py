"""``benchmarks/gpu_check.sh --cpu-smoke``: every step of the GPU check runs (tiny sizes, no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = [line.split()[0] for line in summary.splitlines() if line.split()[1:2] == ["ok"]]
    assert steps == [
        "kernel-tests",
        "bench-kernels",
        "bench-qlora",
        "bench-memory",
        "ledger-check",
        "offload-speed",
        "ledger-smoke",
        "results-md",
    ]
    results = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
    scenarios = {r["scenario"] for res in results for r in res["rows"]}
    assert {"decode-linear", "qlora-step", "memory"} <= scenarios
    assert "## Memory ledger" in (tmp_path / "ledger-smoke.log").read_text()
    assert "fastpeft benchmark results" in (tmp_path / "RESULTS.md").read_text()
    speed = json.loads((tmp_path / "offload_speed.json").read_text())
    assert speed["offloaded"]["tokens_per_s"] > 0
