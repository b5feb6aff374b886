"""Test set-up shared by every test folder.

Triton decides at decoration time whether a kernel runs in its interpreter, so without CUDA we set
TRITON_INTERPRET=1 before anything imports fastpeft.kernels. Tests marked ``triton`` then run the
Triton kernels themselves on CPU; every other CPU test is pinned to the torch reference (fast).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastpeft.kernels.backend import force_backend, interpreting  # noqa: E402

# under pytest-xdist each worker gets one thread so two workers share the two cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _pin_backend(request):
    """``@pytest.mark.triton`` tests run the Triton kernels; other CPU tests the torch reference."""
    if request.node.get_closest_marker("triton") is not None:
        with force_backend("triton"):
            yield
    elif interpreting():
        with force_backend("torch"):
            yield
    else:
        yield
