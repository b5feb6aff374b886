"""Shared fixtures for the training tests: a tiny Llama config, the bundled tokenizer, a small
arithmetic dataset, and how to start a fresh Python that imports this checkout.

(Fixtures rather than importable helpers: pytest runs with ``--import-mode=importlib``.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tiny_llama(**overrides) -> dict:
    cfg = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=112, max_position_embeddings=128)  # fmt: skip
    cfg.update(overrides)
    return cfg


def _python_command(code: str) -> tuple[list[str], dict[str, str], str]:
    """(argv, env, cwd) running ``code`` in a new interpreter that imports this checkout's fastpeft."""
    env = dict(os.environ)
    # the tests' TRITON_INTERPRET=1 would send the child's CPU tensors through the (slow) interpreter
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return [sys.executable, "-c", code], env, str(REPO_ROOT)


@pytest.fixture(scope="session")
def char_tokenizer():
    from fastpeft.training.tokenizer import load_char_tokenizer

    return load_char_tokenizer()


@pytest.fixture(scope="session")
def arithmetic_records():
    from fastpeft.training.arithmetic import make_arithmetic_dataset

    return make_arithmetic_dataset(64, seed=0, digits=2)


@pytest.fixture(scope="session")
def tiny_llama():
    """``tiny_llama(**overrides)`` -> a model_config dict for a 2-layer Llama."""
    return _tiny_llama


@pytest.fixture(scope="session")
def python_command():
    """``python_command(code)`` -> (argv, env, cwd) for ``subprocess.run``."""
    return _python_command


@pytest.fixture(scope="session")
def require_bwrap():
    """Skip a sandbox test where bubblewrap cannot run; fail instead when FASTPEFT_REQUIRE_BWRAP=1
    (set by .ci/run, so CI always tests the real boundary)."""
    from fastpeft.training.rewards.sandbox_bwrap import bwrap_problem

    problem = bwrap_problem()
    if problem is not None:
        if os.environ.get("FASTPEFT_REQUIRE_BWRAP") == "1":
            pytest.fail(f"FASTPEFT_REQUIRE_BWRAP=1 but {problem}")
        pytest.skip(problem)
