"""Run model-written Python against unit tests in a separate, limited process; never in ours.

Layers of containment (the child is ``python -I -S`` running a small trusted runner, below):

1. **Process**: its own session / process group, killed with ``SIGKILL`` on the wall-time limit
   (and after every run, so nothing it forked lingers); a throw-away working directory
   (``tempfile.mkdtemp``, deleted afterwards); stdin closed after the runner reads its job.
2. **Resource limits** (``resource.setrlimit`` in the child before any untrusted code runs):
   ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS`` (address space: a huge allocation fails with
   MemoryError), ``RLIMIT_NPROC`` (a fork bomb runs out of processes), ``RLIMIT_FSIZE`` (file and
   stdout size), ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0``.
3. **Isolation**, ``isolation="auto"`` picks the first that works on this machine:

   - ``"namespaces"``: the child starts under ``unshare --user --map-root-user --net --mount --pid
     --fork --kill-child``: a network namespace with no interfaces (no network at all, loopback
     included), a mount namespace where the runner remounts every mount read-only except a bind
     mount of the working directory, and a PID namespace (killing it kills everything inside, even
     processes that left the process group).
   - ``"rlimits"``: no namespaces (``unshare`` missing or user namespaces disabled). A root trainer's
     child drops to ``nobody`` (so RLIMIT_NPROC applies and root-owned files are read-only to it);
     common stdlib modules are imported before the drop. Network and file-system writes are then
     blocked by the audit hook alone.

4. **Audit hook** (both tiers, installed by the runner before the untrusted code): refuses socket
   creation/connection, ``fork`` and process launching (``exec*``, ``posix_spawn``,
   ``subprocess``, ``os.system``), ``ctypes``, ``os.kill``, and any open-for-writing, remove,
   rename, mkdir, chmod, link... of a path outside the working directory. Python's audit hooks are
   not a security boundary on their own (C extensions can bypass them), which is why layers 1-3
   exist; in the ``rlimits`` tier the hook is the network and file-system guard, a weaker one.

Fork bombs: the kernel never applies RLIMIT_NPROC to real root (kuid 0, also when mapped to root
of a user namespace), so for a root trainer in the ``namespaces`` tier the audit hook's fork ban
plus the PID namespace (everything dies at the wall-time limit) contain them; for any other user,
and for the ``rlimits`` tier (which runs as ``nobody`` under a root trainer), RLIMIT_NPROC does.

**Verdicts are made here, not in the child.** A test ``assert f(2) == 4`` is split in the trainer's
process into the expression ``f(2)`` (sent to the child) and the expected value ``4`` (kept here);
the child only reports ``repr`` of each value (plain builtin types only), on a line tagged with a
per-run nonce. ``sys.exit(0)``, patched ``assert``/builtins or printed fake results therefore
cannot fake a pass without computing the answers: the child never sees what a correct answer is.
``assert not g(x)`` is sent as ``g(x)`` so the expected truth value is hidden too.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Isolation = Literal["auto", "namespaces", "rlimits"]
_MARKER = "\x00fastpeft-sandbox-result\x00"
_UNSHARE = [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork",
            "--kill-child", "--propagation", "private"]  # fmt: skip
_NOBODY = 65534
# stdlib modules imported before a root runner drops to ``nobody`` (see the runner)
_PRELOAD = ("abc", "array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal", "enum",
            "fractions", "functools", "hashlib", "heapq", "io", "itertools", "json", "math", "numbers", "operator",
            "random", "re", "statistics", "string", "struct", "textwrap", "time", "typing", "unicodedata")  # fmt: skip

# The trusted runner executed in the child (stdlib only; ``-I -S``: no site, no user paths).
_RUNNER = r'''
import json, os, resource, sys
job = json.loads(sys.stdin.read()); sys.stdin.close()
marker = "\x00fastpeft-sandbox-result\x00" + job.pop("nonce")
work = job["workdir"]
if job["isolation"] == "namespaces":
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    OPT = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        flags = 4096 | 32 | 1  # MS_BIND | MS_REMOUNT | MS_RDONLY, keeping the locked flags
        for o in f[5].split(","):
            flags |= OPT.get(o, 0)
        libc.mount(None, f[4].encode().decode("unicode_escape").encode(), None, flags, None)
    if libc.mount(work.encode(), work.encode(), None, 4096, None) or libc.mount(None, work.encode(), None, 4096 | 32, None):
        raise OSError(ctypes.get_errno(), "cannot bind-mount the working directory read-write")
    del ctypes, libc
os.chdir(work)
lim = job["limits"]
for name, value in (("RLIMIT_CPU", (lim["cpu"], lim["cpu"] + 1)), ("RLIMIT_AS", (lim["mem"],) * 2),
                    ("RLIMIT_NPROC", (lim["nproc"],) * 2), ("RLIMIT_FSIZE", (lim["fsize"],) * 2),
                    ("RLIMIT_NOFILE", (lim["nofile"],) * 2), ("RLIMIT_CORE", (0, 0))):
    resource.setrlimit(getattr(resource, name), value)
if job["isolation"] == "rlimits" and os.geteuid() == 0:
    # nobody may not be able to read the interpreter's stdlib (e.g. under /root): import common
    # modules while still root
    for name in job["preload"]:
        try:
            __import__(name)
        except Exception:
            pass
    os.setgroups([]); os.setgid(65534); os.setuid(65534)

def _install_hook(realpath=os.path.realpath, fsdecode=os.fsdecode, sep=os.sep, PermissionError=PermissionError):
    root = realpath(work)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    blocked = frozenset(("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
        "socket.sendmsg", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
        "os.system", "os.startfile",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "os.kill", "os.killpg",
        "signal.pthread_kill", "pty.spawn"))
    path_events = frozenset(("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.link",
        "os.symlink", "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
        "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.copyfile", "shutil.copytree", "shutil.move"))
    blocked_modules = frozenset(("_posixsubprocess", "_ctypes", "ctypes"))

    def inside(p):
        if isinstance(p, int):
            return True
        try:
            p = realpath(fsdecode(p))
        except Exception:
            return False
        return p == root or p.startswith(root + sep)

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        elif event in path_events:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                    raise PermissionError(f"sandbox: {event} on {a!r} outside the working directory")
        elif event == "import" and args[0] in blocked_modules:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    sys.addaudithook(hook)

out = os.fdopen(os.dup(1), "w")
SAFE = (int, float, complex, str, bytes, bool, type(None))
SEQS = (list, tuple, set, frozenset)

def safe(v, depth=0, type=type, isinstance=isinstance, all=all):
    t = type(v)
    if t in SAFE:
        return True
    if depth > 20:
        return False
    if t in SEQS:
        return all(safe(x, depth + 1) for x in v)
    if t is dict:
        return all(safe(k, depth + 1) and safe(x, depth + 1) for k, x in v.items())
    return False

if job["audit_hook"]:
    _install_hook()
results, error, ns = [], None, {"__name__": "__solution__"}
try:
    exec(compile(job["code"], "solution.py", "exec"), ns)
except BaseException as e:
    error = f"{type(e).__name__}: {str(e)[:300]}"
for i, expr in enumerate(job["exprs"]):
    if error is not None:
        break
    try:
        value = eval(compile(expr, f"<test {i}>", "eval"), ns)
        if safe(value):
            results.append({"ok": True, "repr": repr(value)[:20000]})
        else:
            results.append({"ok": False, "error": f"returned a {type(value).__name__}, not a plain builtin value"})
    except BaseException as e:
        results.append({"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
out.write("\n" + marker + json.dumps({"results": results, "error": error}) + "\n")
out.flush()
os._exit(0)
'''


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run."""

    wall_time_s: float = 5.0
    cpu_time_s: int = 2
    memory_mb: int = 512
    max_processes: int = 32
    max_file_mb: int = 8
    max_open_files: int = 64

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"SandboxLimits.{f.name} must be positive, got {getattr(self, f.name)}")


@dataclasses.dataclass(frozen=True)
class TestCase:
    """One test: ``expr`` is evaluated in the child, the verdict uses ``expected`` (kept here)."""

    expr: str
    expected: Any
    kind: Literal["eq", "ne", "truthy"]
    source: str


@dataclasses.dataclass
class SandboxResult:
    passed: int
    total: int
    outcomes: list[dict[str, Any]]  # per test: {"test", "passed", "detail"}
    timed_out: bool
    returncode: int | None
    isolation: str
    error: str | None  # the solution failed to load, the runner died, or the run timed out
    stderr_tail: str
    wall_s: float

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def parse_test(test: str | tuple[str, Any]) -> TestCase:
    """``"assert f(2) == 4"`` / ``"assert f(2) != 5"`` / ``"assert f(2) is None"`` /
    ``"assert ok(3)"`` / ``"assert not ok(4)"``, or a pair ``("f(2)", 4)``. One side of a
    comparison must be a Python literal (ValueError otherwise, naming the test)."""
    if isinstance(test, tuple):
        if len(test) != 2 or not isinstance(test[0], str):
            raise ValueError(f"a test pair must be (expression, expected value), got {test!r}")
        ast.parse(test[0], mode="eval")
        return TestCase(test[0], test[1], "eq", repr(test))
    if not isinstance(test, str):
        raise TypeError(f"a test must be a str or an (expression, expected) pair, got {type(test).__name__}")
    try:
        tree = ast.parse(test.strip())
    except SyntaxError as err:
        raise ValueError(f"test {test!r} does not parse: {err.msg}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise ValueError(f"test {test!r} must be a single assert statement")
    node = tree.body[0].test
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return TestCase(ast.unparse(node.operand), False, "truthy", test)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Eq, ast.NotEq, ast.Is)):
        left, right = node.left, node.comparators[0]
        for expr, lit in ((left, right), (right, left)):
            try:
                value = ast.literal_eval(lit)
            except ValueError:
                continue
            if isinstance(node.ops[0], ast.Is) and value is not None:
                break
            return TestCase(ast.unparse(expr), value, "ne" if isinstance(node.ops[0], ast.NotEq) else "eq", test)
        raise ValueError(f"test {test!r}: one side of the comparison must be a literal (== / != / is None)")
    return TestCase(ast.unparse(node), True, "truthy", test)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    if type(a) in (list, tuple) and type(b) in (list, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _verdict(case: TestCase, reply: dict[str, Any] | None) -> tuple[bool, str]:
    if reply is None:
        return False, "no result"
    if not reply.get("ok"):
        return False, str(reply.get("error", "error"))[:300]
    try:
        value = ast.literal_eval(reply["repr"])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, "unreadable result"
    if case.kind == "truthy":
        ok = bool(value) is case.expected
    elif case.kind == "ne":
        ok = not _equal(value, case.expected)
    else:
        ok = _equal(value, case.expected)
    return ok, "passed" if ok else f"got {reply['repr'][:200]}"


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether ``unshare`` can create user+net+mount+pid namespaces here (probed once)."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run([*_UNSHARE, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def resolve_isolation(isolation: Isolation) -> str:
    if isolation == "auto":
        return "namespaces" if namespaces_available() else "rlimits"
    if isolation == "namespaces" and not namespaces_available():
        raise RuntimeError("isolation='namespaces' needs `unshare` with unprivileged user namespaces")
    if isolation not in ("namespaces", "rlimits"):
        raise ValueError(f"isolation must be 'auto', 'namespaces' or 'rlimits', got {isolation!r}")
    return isolation


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_tests_in_sandbox(code: str, tests: Sequence[str | tuple[str, Any]], limits: SandboxLimits | None = None,
                         isolation: Isolation = "auto", audit_hook: bool = True) -> SandboxResult:  # fmt: skip
    """Run ``code`` and then each test's expression in a sandboxed child; verdicts are made here.

    ``audit_hook=False`` leaves out layer 4; only tests of the other layers should use it.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    cases = [parse_test(t) for t in tests]
    if not cases:
        raise ValueError("run_tests_in_sandbox needs at least one test")
    limits = limits or SandboxLimits()
    mode = resolve_isolation(isolation)
    mib = 1024 * 1024
    job_limits = {"cpu": int(limits.cpu_time_s), "mem": int(limits.memory_mb * mib), "nproc": int(limits.max_processes),
                  "fsize": int(limits.max_file_mb * mib), "nofile": int(limits.max_open_files)}  # fmt: skip
    workdir = tempfile.mkdtemp(prefix="fastpeft-sandbox-")
    logs = tempfile.TemporaryDirectory(prefix="fastpeft-sandbox-logs-")
    start = time.perf_counter()
    timed_out, returncode = False, None
    try:
        if mode == "rlimits" and os.geteuid() == 0:
            os.chown(workdir, _NOBODY, _NOBODY)
        nonce = secrets.token_hex(16)
        job = {"nonce": nonce, "workdir": workdir, "isolation": mode, "limits": job_limits, "code": code,
               "audit_hook": audit_hook, "preload": _PRELOAD, "exprs": [c.expr for c in cases]}  # fmt: skip
        argv = [sys.executable, "-I", "-S", "-c", _RUNNER]
        if mode == "namespaces":
            argv = [*_UNSHARE, *argv]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        with open(os.path.join(logs.name, "out"), "w+b") as out, open(os.path.join(logs.name, "err"), "w+b") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env,
                                    start_new_session=True, close_fds=True)  # fmt: skip
            try:
                proc.communicate(json.dumps(job).encode(), timeout=limits.wall_time_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)  # also reaps anything it forked into its group
                returncode = proc.wait()
            out.seek(0)
            stdout = out.read(limits.max_file_mb * mib + 4096).decode("utf-8", "replace")
            err.seek(0)
            stderr_tail = err.read()[-2000:].decode("utf-8", "replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        logs.cleanup()
    wall = time.perf_counter() - start
    payload = None
    marker = _MARKER + nonce
    if marker in stdout:
        try:
            payload = json.loads(stdout.rsplit(marker, 1)[1].splitlines()[0])
        except (json.JSONDecodeError, IndexError):
            payload = None
    replies = payload.get("results", []) if isinstance(payload, dict) else []
    error = payload.get("error") if isinstance(payload, dict) else None
    if timed_out:
        error = f"timed out after {limits.wall_time_s}s"
    elif payload is None:
        error = f"the sandboxed process ended without a result (return code {returncode})"
    outcomes = []
    for i, case in enumerate(cases):
        reply = replies[i] if i < len(replies) and isinstance(replies[i], dict) else None
        ok, detail = _verdict(case, reply)
        outcomes.append({"test": case.source, "passed": ok, "detail": detail})
    passed = sum(o["passed"] for o in outcomes)
    return SandboxResult(passed, len(cases), outcomes, timed_out, returncode, mode, error, stderr_tail, wall)


class CodeReward:
    """Reward function ``(prompt, completion, record) -> float`` for code tasks.

    The code is the completion's fenced Python block(s) (or the whole completion); the tests are
    ``record[tests_key]`` (see :func:`parse_test`). Reward: the share of tests passed
    (``partial=True``) or 1.0 / 0.0 for all / not all. ``score_batch`` runs up to ``max_workers``
    sandboxes at once (each is a subprocess; the threads only wait on them).
    """

    def __init__(self, limits: SandboxLimits | None = None, isolation: Isolation = "auto", partial: bool = True,
                 tests_key: str = "tests", max_workers: int | None = None):  # fmt: skip
        self.limits, self.isolation, self.partial, self.tests_key = limits or SandboxLimits(), isolation, partial, tests_key
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

    def score_batch(self, prompts: Sequence[str], completions: Sequence[str],
                    records: Sequence[Mapping[str, Any]]) -> list[float]:  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(self, prompts, completions, records))
