"""pytest-benchmark suite: a whole QLoRA training step, ours vs HF + bnb + PEFT (the workload times itself)."""

import pytest

from fastpeft_benchmarks.scenarios import qlora_step
from fastpeft_benchmarks.suite import params, run_param


@pytest.mark.parametrize(("case", "impl", "device"), params(qlora_step, gpu_marks=(pytest.mark.slow,)))
def test_qlora_step(benchmark, case, impl, device):
    benchmark.group = f"qlora-step {case.label}"
    run_param(benchmark, case, impl, device)
