"""Set-up for the pytest-benchmark suites in this folder.

Mirrors tests/conftest.py: when the Triton interpreter is on (TRITON_INTERPRET=1, set by the test
suite on machines without CUDA) CPU tensors would run our Triton kernels in the interpreter, far too
slowly for a benchmark; so these suites pin the torch reference on CPU unless a test is marked
``triton``. The harness package itself is loaded the way ``fastpeft bench`` loads it.
"""

import pytest

from fastpeft.cli.bench import load_benchmarks
from fastpeft.kernels.backend import force_backend, interpreting

load_benchmarks()


@pytest.fixture(autouse=True)
def _pin_backend_for_benchmarks(request):
    if interpreting() and request.node.get_closest_marker("triton") is None:
        with force_backend("torch"):
            yield
    else:
        yield
