"""Run model-written Python against unit tests behind a real isolation boundary; judge here.

- **Boundary** (:mod:`.sandbox_bwrap`): bubblewrap with every namespace unshared, uid 65534 without
  capabilities, a read-only view of only the interpreter and its libraries, a size-capped tmpfs as
  the only writable place, a new session, ``--die-with-parent``; the trusted runner
  (:mod:`.sandbox_runner`) sets RLIMIT_CPU / AS / NPROC / FSIZE / NOFILE / CORE before the
  candidate's first line. After the run (or at the wall-time limit) the namespace's init is killed,
  which kills every process in it, and this call returns only once they are gone.
- **No tool, no run**: without a working ``bwrap`` code rewards raise :class:`SandboxUnavailableError`,
  whose one line says how to install it. ``isolation="unsafe-rlimits-only"`` is the explicit,
  loudly warned opt-in to a plain subprocess with the same rlimits, a throw-away working directory
  and a process-group kill: it contains accidents (loops, memory, forks) but isolates nothing: the
  code can read and write whatever the trainer's user can and reach the network.
- **Integrity** (:mod:`.sandbox_verdict`): the child only computes the values of the candidate's
  expressions and returns plain data; every assertion is evaluated in this process on those
  values, so nothing the child prints, patches or overrides can pass a test. Hostile output scores
  0: it never raises here and never yields None.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from fastpeft.training.rewards.sandbox_bwrap import bwrap_problem, python_executable, sandbox_command
from fastpeft.training.rewards.sandbox_process import remove_tree, run_supervised
from fastpeft.training.rewards.sandbox_verdict import MAX_DEPTH, MAX_ITEMS, compile_test, judge, read_answers

Isolation = Literal["bwrap", "unsafe-rlimits-only"]
UNSAFE = "unsafe-rlimits-only"
_MIB = 1024 * 1024


class SandboxUnavailableError(OSError):
    """No isolation tool can run here; the message (one line) says how to get one."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run."""

    wall_time_s: float = 5.0  # the whole process tree is killed then
    cpu_time_s: int = 2  # RLIMIT_CPU per process
    memory_mb: int = 512  # RLIMIT_AS per process
    max_processes: int = 32  # RLIMIT_NPROC: processes and threads of the sandbox's uid
    max_file_mb: int = 8  # RLIMIT_FSIZE: largest file
    max_open_files: int = 64  # RLIMIT_NOFILE
    disk_mb: int = 16  # size of the writable tmpfs (bwrap tier)
    max_result_kb: int = 1024  # what the child may send back, in all

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"SandboxLimits.{f.name} must be a positive number, got {value!r}")


@dataclasses.dataclass
class SandboxResult:
    passed: int
    total: int
    outcomes: list[dict[str, Any]]  # per test: {"test", "passed", "detail"}
    timed_out: bool
    returncode: int | None
    isolation: str
    error: str | None  # the solution failed to load, the run died or timed out, or flooded its output
    stderr_tail: str
    wall_s: float

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def resolve_isolation(isolation: str) -> str:
    """Check that ``isolation`` can run here (SandboxUnavailableError / ValueError otherwise)."""
    if isolation == "bwrap":
        problem = bwrap_problem()
        if problem is not None:
            raise SandboxUnavailableError(
                f"code rewards will not run model-written code without isolation: {problem} "
                f"(or opt in to no isolation with isolation={UNSAFE!r})"
            )
        return isolation
    if isolation == UNSAFE:
        _warn_unsafe()
        return isolation
    raise ValueError(f"isolation must be 'bwrap' or {UNSAFE!r}, got {isolation!r}")


@functools.lru_cache(maxsize=1)
def _warn_unsafe() -> None:
    warnings.warn(
        f"isolation={UNSAFE!r}: model-written code runs with resource limits only, NOT isolated: it can "
        "read and write the trainer's files and use the network",
        RuntimeWarning,
        stacklevel=4,
    )


@functools.lru_cache(maxsize=1)
def _runner_source() -> str:
    return (Path(__file__).parent / "sandbox_runner.py").read_text()


def _job(code: str, probes: list[str], limits: SandboxLimits) -> bytes:
    return json.dumps(
        {
            "code": code,
            "probes": probes,
            "max_depth": MAX_DEPTH,
            "max_items": MAX_ITEMS,
            "max_value_bytes": limits.max_result_kb * 1024,
            "limits": {
                "cpu_s": math.ceil(limits.cpu_time_s),
                "memory_bytes": int(limits.memory_mb * _MIB),
                "processes": int(limits.max_processes),
                "file_bytes": int(limits.max_file_mb * _MIB),
                "open_files": int(limits.max_open_files),
            },
        }
    ).encode()


def run_tests_in_sandbox(
    code: str,
    tests: Sequence[str | tuple[str, Any]],
    limits: SandboxLimits | None = None,
    isolation: Isolation = "bwrap",
) -> SandboxResult:
    """Run ``code``, then the candidate expressions of each test, in a sandboxed child; evaluate the
    tests here on the returned values (see :func:`~.sandbox_verdict.compile_test` for test forms)."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    compiled = [compile_test(t) for t in tests]
    if not compiled:
        raise ValueError("run_tests_in_sandbox needs at least one test")
    limits = limits or SandboxLimits()
    mode = resolve_isolation(isolation)
    probes = [p for t in compiled for p in t.probes]
    argv = [python_executable(), "-I", "-S", "-c", _runner_source()]
    workdir = None
    try:
        if mode == "bwrap":
            disk = int(limits.disk_mb * _MIB)
            child = run_supervised(
                lambda fd: sandbox_command(argv, disk, fd),
                _job(code, probes, limits),
                limits.wall_time_s,
                limits.max_result_kb * 1024 + 4096,
                {},
                info=True,
            )
        else:
            workdir = tempfile.mkdtemp(prefix="fastpeft-sandbox-")
            env = {"HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}
            child = run_supervised(
                lambda fd: argv,
                _job(code, probes, limits),
                limits.wall_time_s,
                limits.max_result_kb * 1024 + 4096,
                env,
                info=False,
                cwd=workdir,
            )
    finally:
        if workdir is not None:
            remove_tree(workdir)
    load_error, values, errors, loaded = read_answers(child.lines, len(probes))
    error = None
    if child.timed_out:
        error = f"timed out after {limits.wall_time_s}s"
    elif child.overflowed:
        error = f"the sandboxed process wrote more than {limits.max_result_kb} KiB of results"
    elif load_error is not None:
        error = f"the solution failed to load: {load_error}"
    elif not loaded:
        reason = child.stderr_tail.strip().splitlines()[-1:] or [f"return code {child.returncode}"]
        error = f"the sandboxed process ended without a result ({reason[0][:200]})"
    outcomes, start = [], 0
    for test in compiled:
        local = range(start, start + len(test.probes))
        start += len(test.probes)
        if not loaded or load_error is not None or child.overflowed:  # a flood is hostile: nothing counts
            ok, detail = False, error or "the solution did not load"
        else:
            ok, detail = judge(
                test,
                {i - local.start: values[i] for i in local if i in values},
                {i - local.start: errors[i] for i in local if i in errors},
            )
            if not ok and error and "gave no result" in detail:
                detail = f"{detail} ({error})"
        outcomes.append({"test": test.source, "passed": ok, "detail": detail})
    passed = sum(o["passed"] for o in outcomes)
    return SandboxResult(
        passed,
        len(compiled),
        outcomes,
        child.timed_out,
        child.returncode,
        mode,
        error,
        child.stderr_tail[-2000:],
        child.wall_s,
    )


class CodeReward:
    """Reward function ``(prompt, completion, record) -> float`` for code tasks.

    The code is the completion's fenced Python block(s) (or the whole completion); the tests are
    ``record[tests_key]`` (see :func:`~.sandbox_verdict.compile_test`). Reward: the share of tests
    passed (``partial=True``) or 1.0 / 0.0 for all / not all. Construction checks that the
    isolation can run here (:class:`SandboxUnavailableError` otherwise). ``score_batch`` runs up to
    ``max_workers`` sandboxes at once (each is a subprocess; the threads only wait on them).
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        isolation: Isolation = "bwrap",
        partial: bool = True,
        tests_key: str = "tests",
        max_workers: int | None = None,
    ):
        self.limits, self.partial, self.tests_key = limits or SandboxLimits(), partial, tests_key
        self.isolation = resolve_isolation(isolation)
        self.max_workers = max_workers or max(1, min(8, os.cpu_count() or 1))
        self.__name__ = "code"

    def code_of(self, completion: str) -> str:
        from fastpeft.reasoning.verifiers.syntax import python_blocks

        return "\n\n".join(python_blocks(completion))

    def __call__(self, prompt: str, completion: str, record: Mapping[str, Any]) -> float:
        if self.tests_key not in record:
            raise KeyError(f"code reward needs record[{self.tests_key!r}] (a list of assert statements)")
        result = run_tests_in_sandbox(self.code_of(completion), record[self.tests_key], self.limits, self.isolation)
        return result.pass_rate if self.partial else float(result.all_passed)

    def score_batch(
        self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping[str, Any]]
    ) -> list[float]:
        with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(self, prompts, completions, records))
