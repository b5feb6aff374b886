"""``python -m fastpeft`` from the repository root: our kernels/ folder must not pass for the
top-level ``kernels`` package (Hugging Face's kernel hub) that bitsandbytes probes for."""

from __future__ import annotations

import json
import subprocess

CHILD = """
import importlib.util, json, runpy, sys
before = importlib.util.find_spec("kernels")
sys.argv = ["fastpeft", "--help"]
try:
    runpy.run_module("fastpeft", run_name="__main__", alter_sys=True)  # what `python -m fastpeft` runs
except SystemExit as exit:
    code = exit.code
import bitsandbytes  # its CPU backend imports `kernels` for optional kernels
after = importlib.util.find_spec("kernels")
shadow = sys.modules.get("kernels")
print(json.dumps({"code": code, "before": before and before.origin, "after": after and after.origin,
                  "imported": getattr(shadow, "__file__", None)}))
"""


def test_python_m_fastpeft_from_the_root_does_not_import_our_kernels_as_kernels(python_command, tmp_path):
    argv, env, root = python_command(CHILD)
    env.pop("PYTHONPATH")  # only what `python -m` itself puts on sys.path: the working directory
    done = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    ours = f"{root}/kernels/__init__.py"
    assert seen["code"] == 0 and seen["before"] == ours  # the shadowing is real before the command runs
    assert seen["after"] != ours and seen["imported"] != ours
    assert "from 'kernels'" not in done.stderr  # bitsandbytes' "cannot import name 'get_kernel'" warning


DEMO_CHILD = """
import importlib.util, json, sys
before = importlib.util.find_spec("kernels")
sys.argv = ["-m"]  # what `python -m fastpeft.demo.efficacy` shows while it imports the package
import fastpeft.demo
after = importlib.util.find_spec("kernels")
print(json.dumps({"before": before and before.origin, "after": after and after.origin}))
"""


def test_python_m_fastpeft_demo_script_from_the_root_unshadows_too(python_command):
    argv, env, root = python_command(DEMO_CHILD)
    env.pop("PYTHONPATH")
    done = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == f"{root}/kernels/__init__.py" and seen["after"] != seen["before"]
