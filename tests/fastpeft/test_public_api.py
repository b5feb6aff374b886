"""``fastpeft.__all__`` is exactly what the package exports; importing it initialises no CUDA."""

from __future__ import annotations

import inspect
import subprocess
import sys

import fastpeft


def test_all_lists_every_public_name_and_only_those():
    exported = {n for n, v in vars(fastpeft).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert set(fastpeft.__all__) == exported | {"__version__"}
    assert len(fastpeft.__all__) == len(set(fastpeft.__all__))


def test_import_initialises_no_cuda():
    code = "import fastpeft, torch; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False"]
