"""pytest-benchmark suite: sampling N continuations, our sampler vs HF generate (the workload times itself)."""

import pytest

from fastpeft_benchmarks.scenarios import sampling
from fastpeft_benchmarks.suite import params, run_param


@pytest.mark.parametrize(("case", "impl", "device"), params(sampling, gpu_marks=(pytest.mark.slow,)))
def test_sampling(benchmark, case, impl, device):
    benchmark.group = f"sampling {case.label}"
    run_param(benchmark, case, impl, device)
