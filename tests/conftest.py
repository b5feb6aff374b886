"""Test set-up shared by every test folder.

Triton decides at decoration time whether a kernel runs in its interpreter, so without CUDA we set
TRITON_INTERPRET=1 before anything imports fastpeft.kernels. Tests marked ``triton`` then run the
Triton kernels themselves on CPU; every other CPU test is pinned to the torch reference (fast).

Fixtures for every folder (a fixture is visible only below its conftest; fixtures rather than
importable helpers because pytest runs with ``--import-mode=importlib``): ``tiny_llama`` (a
model_config dict), ``char_tokenizer`` (the bundled tokenizer), ``arithmetic_records`` (a small
arithmetic dataset), ``python_command`` (a fresh Python that imports this checkout),
``arithmetic_mock`` (a deterministic mock of an arithmetic model, for the search tests),
``peft_kit`` (helpers for the PEFT-path and TRL tests) and ``require_bwrap`` (skips a code-sandbox
test where bubblewrap cannot run; fails instead with ``FASTPEFT_REQUIRE_BWRAP=1``, which CI sets).
"""

import os
import random
import re
import sys
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fastpeft.kernels.backend import force_backend, interpreting
from fastpeft.reasoning.types import Completion, SamplingParams

# under pytest-xdist each worker gets one thread so two workers share the two cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def _tiny_llama(**overrides) -> dict:
    cfg = dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=112,
        max_position_embeddings=128,
    )
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
    from fastpeft.demo.arithmetic import make_arithmetic_dataset

    return make_arithmetic_dataset(64, seed=0, digits=2)


@pytest.fixture(scope="session")
def tiny_llama():
    """``tiny_llama(**overrides)`` -> a model_config dict for a 2-layer Llama (vocab: the char tokenizer's)."""
    return _tiny_llama


@pytest.fixture(scope="session")
def tiny_config():
    """The one-block tiny Llama of the recipe tests: ``tiny_llama(num_hidden_layers=1)``."""
    return _tiny_llama(num_hidden_layers=1)


@pytest.fixture(scope="session")
def python_command():
    """``python_command(code)`` -> (argv, env, cwd) for ``subprocess.run``."""
    return _python_command


# ---------------------------------------------------------------- the search tests' mock model
_QUESTION = re.compile(r"Q: ([\d+]+)=\?\nA:")
_STEP = re.compile(r"^\s*(-?\d+)\+(-?\d+)=(-?\d+)$")
_TOKEN = re.compile(r"\d+|\D")


class ArithmeticMock:
    """A deterministic mock of an arithmetic model (the ``arithmetic_mock`` fixture).

    The mock answers prompts like ``"Q: 3+5+9+4=?\\nA:"`` in the bundled task's style, one step per
    addition, steps ending with ``"; "``::

         3+5=8; 8+9=17; 17+4=21; answer 21<EOS>

    Each step's sum is wrong with probability ``error_rate`` (and that token then gets logprob
    ``error_logprob``); errors propagate to the answer. At temperature 0 it is correct except at
    ``greedy_error_step`` (a model whose most likely path is wrong). It continues any prefix it is
    given (so step-level search can feed partial responses back), honours ``max_new_tokens`` and stop
    strings exactly, and is seeded from the call count, the prompt and the row, so every run of a test
    sees the same samples. It counts the tokens it generated, to check the budget bookkeeping.
    """

    def __init__(
        self,
        error_rate: float = 0.3,
        greedy_error_step: int | None = None,
        seed: int = 0,
        token_logprob: float = -0.05,
        error_logprob: float = -2.5,
    ) -> None:
        self.error_rate, self.greedy_error_step, self.seed = error_rate, greedy_error_step, seed
        self.token_logprob, self.error_logprob = token_logprob, error_logprob
        self.calls = 0
        self.tokens_generated = 0
        self.max_rows = 0

    @staticmethod
    def prompt(numbers: list[int]) -> str:
        return "Q: " + "+".join(map(str, numbers)) + "=?\nA:"

    def _continuation(self, text: str, greedy: bool, rng: random.Random) -> list[tuple[str, float]]:
        """(token, logprob) pairs from the state ``text`` ends in to the end of the response."""
        m = _QUESTION.search(text)
        if m is None:
            raise ValueError(f"mock cannot parse the question in {text!r}")
        numbers = [int(x) for x in m.group(1).split("+")]
        response = text[m.end() :]
        parts = response.split("; ")
        done, partial = parts[:-1], parts[-1]
        total = numbers[0]
        for part in done:
            step = _STEP.match(part)
            if step:
                total = int(step.group(3))
        if "answer" in partial:
            return []  # a finished response continues with EOS only
        out: list[tuple[str, float]] = []
        k = len(done)
        while True:
            if k + 1 >= len(numbers):
                line = f"answer {total}"
                tokens = [(t, self.token_logprob) for t in _TOKEN.findall(line)]
                line_tokens = tokens
            else:
                a, b = total, numbers[k + 1]
                wrong = (k == self.greedy_error_step) if greedy else rng.random() < self.error_rate
                c = a + b + ((1 if greedy else rng.choice([-2, -1, 1, 2])) if wrong else 0)
                lead = " " if k == 0 else ""
                line = f"{lead}{a}+{b}={c}; "
                line_tokens = [
                    (t, self.error_logprob if wrong and t == str(c) else self.token_logprob)
                    for t in _TOKEN.findall(line)
                ]
                total = c
            if not out and partial:
                # finish a line that was cut off: emit the rest if it is still on track, else end it
                written = "".join(t for t, _ in line_tokens)
                if written.startswith(partial):
                    line_tokens = [(t, self.token_logprob) for t in _TOKEN.findall(written[len(partial) :])]
                else:
                    line_tokens = [(";", self.token_logprob), (" ", self.token_logprob)]
            out.extend(line_tokens)
            if line.startswith("answer"):
                return out
            k += 1

    def generate(self, prompts, params: SamplingParams, n: int = 1, adapters=None) -> list[list[Completion]]:
        self.calls += 1
        self.max_rows = max(self.max_rows, len(prompts) * n)
        greedy = params.temperature == 0
        result = []
        for i, prompt in enumerate(prompts):
            row = []
            for j in range(n):
                key = f"{self.seed}|{params.seed}|{self.calls}|{i}|{j}|{prompt}"
                rng = random.Random(zlib.crc32(key.encode()))
                tokens = self._continuation(prompt, greedy, rng)
                text, ids, lps, finish = "", [], [], "eos"
                for t, lp in tokens:
                    if len(ids) == params.max_new_tokens:
                        finish = "length"
                        break
                    text += t
                    ids.append(len(t))
                    lps.append(lp)
                    if any(s in text for s in params.stop):
                        finish = "stop"
                        break
                self.tokens_generated += len(ids)
                row.append(Completion(text=text, token_ids=ids, token_logprobs=lps, finish_reason=finish))
            result.append(row)
        return result


@pytest.fixture
def arithmetic_mock():
    """Factory: ``arithmetic_mock(error_rate=..., greedy_error_step=..., seed=...)``."""
    return ArithmeticMock


@pytest.fixture(scope="session")
def peft_kit():
    """tests/fastpeft/peft_helpers.py as a module: tiny bnb-ready Llamas, bitsandbytes' CPU repack,
    counting fastpeft's fused op in the profiler (for the PEFT-path and TRL tests)."""
    import importlib.util

    name = "fastpeft_tests_peft_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tests" / "fastpeft" / "peft_helpers.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


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
