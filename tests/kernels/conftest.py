"""Fixtures of the kernel tests. ``sm90`` compiles Triton kernels for an H100 (sm_90) without a GPU
and reads their SASS: register use, stack (spills) and the memory instructions, with the ptxas and
cuobjdump that ship with Triton.

The compile runs in a subprocess without ``TRITON_INTERPRET`` (the test process has the kernels
decorated for the interpreter). As Triton's launcher specialises them, pointer arguments are known
16-byte aligned, the integer arguments named in ``divisible`` multiples of 16 and those in ``ones``
the constant 1 (unit strides), so the loads come out as they would in a real launch.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

_SCRIPT = r"""
import importlib, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
out = {}
for spec in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    sig = dict(spec["signature"], **{n: "constexpr" for n in spec["ones"]})
    constexprs = dict(spec["constexprs"], **{n: 1 for n in spec["ones"]})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in sig.items() if t.startswith("*") or n in spec["divisible"]}
    k = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
    out[spec["label"]] = {"usage": usage, "sass": sass}
print(json.dumps(out))
"""


@dataclasses.dataclass
class Compiled:
    """One kernel compiled for sm_90: resource usage and the count of each memory instruction."""

    registers: int
    stack: int
    local: int
    sass: str

    @property
    def memory_ops(self) -> collections.Counter:
        """e.g. ``{"LDG.E.128": 1, "LDG.E": 8, "STG.E.128": 4, ...}`` (global, shared, local, shuffles)."""
        ops = re.findall(r"\b((?:LDG|STG|LDS|STS|LDL|STL|SHFL|LDSM|STSM)(?:\.[\w]+)*)\b", self.sass)
        return collections.Counter(ops)

    def global_loads(self, loop_only: bool = False) -> dict[str, int]:
        """Global load instructions by kind; with ``loop_only`` only those inside the kernel's loops
        (between a backward branch and its target): the per-iteration loads of a K loop."""
        lines = self.sass.splitlines()
        if loop_only:
            addr = lambda line: int(re.search(r"/\*([0-9a-f]{4,})\*/", line).group(1), 16)  # noqa: E731
            spans = [
                (int(m.group(1), 16), addr(line))
                for line in lines
                if (m := re.search(r"\bBRA(?:\.\w+)* (0x[0-9a-f]+)", line)) and int(m.group(1), 16) < addr(line)
            ]
            lines = [
                line
                for line in lines
                if re.search(r"/\*[0-9a-f]{4,}\*/", line) and any(lo <= addr(line) <= hi for lo, hi in spans)
            ]
        ops = re.findall(r"\b(LDG(?:\.[\w]+)*)\b", "\n".join(lines))
        return dict(collections.Counter(ops))


def cuobjdump_available() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))


def compile_sm90(specs: list[dict]) -> dict[str, Compiled]:
    """Compile each spec (``label, module, kernel, signature, constexprs, divisible, ones, num_warps,
    num_stages``; signature as for ``triton.compiler.ASTSource``) and return them by label.

    Skips the calling test when Triton's NVIDIA tools are not installed.
    """
    if not cuobjdump_available():
        pytest.skip("Triton's NVIDIA toolchain (ptxas, cuobjdump) is not installed")
    specs = [{"divisible": [], "ones": [], "num_stages": 1, **s} for s in specs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], input=json.dumps(specs), capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = {}
    for label, got in json.loads(result.stdout.splitlines()[-1]).items():
        line = next(line for line in got["usage"].splitlines() if "REG:" in line)
        fields = dict(re.findall(r"(\w+):(\d+)", line))
        compiled[label] = Compiled(int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"]), got["sass"])
    return compiled


@pytest.fixture
def sm90():
    """:func:`compile_sm90`, for tests that check register use, spills and load widths."""
    return compile_sm90
