"""pytest-benchmark suite: the fused (Q)LoRA linear vs dense torch and bitsandbytes, decode and training."""

import pytest

from fastpeft_benchmarks.scenarios import decode_linear, train_linear
from fastpeft_benchmarks.suite import params, run_param


@pytest.mark.parametrize(("case", "impl", "device"), params(decode_linear))
def test_decode_linear(benchmark, case, impl, device):
    benchmark.group = f"decode-linear {case.group} M={case.x}"
    run_param(benchmark, case, impl, device)


@pytest.mark.parametrize(("case", "impl", "device"), params(train_linear))
def test_train_linear(benchmark, case, impl, device):
    benchmark.group = f"train-linear {case.group} M={case.x}"
    run_param(benchmark, case, impl, device)
