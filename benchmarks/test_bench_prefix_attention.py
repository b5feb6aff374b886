"""pytest-benchmark suite: prefix attention vs SDPA (prefix concatenated + mask, and causal without prefix)."""

import pytest

from fastpeft_benchmarks.scenarios import prefix_attention
from fastpeft_benchmarks.suite import params, run_param


@pytest.mark.parametrize(("case", "impl", "device"), params(prefix_attention))
def test_prefix_attention(benchmark, case, impl, device):
    benchmark.group = f"prefix-attention {case.label}"
    run_param(benchmark, case, impl, device)
