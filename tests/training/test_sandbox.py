"""The code sandbox contains hostile programs: the trainer survives, the reward is 0, nothing is
written outside, no connection is made, and the time is bounded."""

import concurrent.futures
import os
import re
import socket
import time

import pytest

from fastpeft.training.rewards.code_sandbox import (CodeReward, SandboxLimits, namespaces_available, parse_test,
                                                    run_tests_in_sandbox)  # fmt: skip

LIMITS = SandboxLimits(wall_time_s=2.0, cpu_time_s=1, memory_mb=256, max_processes=16, max_file_mb=1)
NO_NAMESPACES = pytest.mark.skipif(not namespaces_available(), reason="no unprivileged user namespaces")
TIERS = ["rlimits", pytest.param("namespaces", marks=NO_NAMESPACES)]
GOOD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]


def _hostile(outside: str, port: int) -> dict[str, str]:
    """Each program would pass the tests (it ends with a correct ``add``) if its hostile part were
    not stopped; the last two try to fake a pass without any ``add``."""
    return {
        "infinite_loop": "while True:\n    pass\n" + GOOD,
        "sleep_forever": "import time\ntime.sleep(1000)\n" + GOOD,
        "fork_bomb": "import os\nwhile True:\n    os.fork()\n" + GOOD,
        "huge_allocation": "x = bytearray(64 * 1024 ** 3)\n" + GOOD,
        "write_outside": f"open({outside!r}, 'w').write('pwned')\n" + GOOD,
        "shell_write_outside": f"import os\nos.system('touch {outside}')\n" + GOOD,
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n" + GOOD,
        "exit_early": "import sys\nsys.exit(0)\n",
        "forged_output": "import os\nprint('\\x00fastpeft-sandbox-result\\x00{\"results\": [{\"ok\": true, \"repr\": \"5\"}, "
                         "{\"ok\": true, \"repr\": \"0\"}]}', flush=True)\nos._exit(0)\n",
    }


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.05)
    yield srv
    srv.close()


def _accepted(srv: socket.socket) -> bool:
    try:
        conn, _ = srv.accept()
    except (socket.timeout, BlockingIOError):
        return False
    conn.close()
    return True


def test_good_code_passes_and_wrong_code_fails():
    result = run_tests_in_sandbox(GOOD, TESTS + ["assert add(1, 1) == 3"], LIMITS)
    assert (result.passed, result.total, result.error) == (2, 3, None)
    assert result.outcomes[2]["detail"] == "got 2"
    reward = CodeReward(LIMITS)
    fenced = f"Here you go:\n```python\n{GOOD}```"
    assert reward("p", fenced, {"tests": TESTS}) == 1.0
    assert reward("p", "def add(a, b):\n    return a * b + 1\n", {"tests": TESTS}) == 0.5  # 7 != 5, 0 == 0


@pytest.mark.parametrize("isolation", TIERS)
def test_hostile_programs_are_contained(isolation, tmp_path, listener):
    outside = str(tmp_path / "pwned.txt")
    programs = _hostile(outside, listener.getsockname()[1])
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(programs)) as pool:
        futures = {name: pool.submit(run_tests_in_sandbox, code, TESTS, LIMITS, isolation)
                   for name, code in programs.items()}  # fmt: skip
        results = {name: f.result() for name, f in futures.items()}
    elapsed = time.perf_counter() - start
    for name, result in results.items():
        assert result.passed == 0 and result.pass_rate == 0.0, (name, result.outcomes)
        assert result.isolation == isolation
        assert result.wall_s < LIMITS.wall_time_s + 3.0, (name, result.wall_s)
    assert elapsed < LIMITS.wall_time_s + 8.0
    assert not os.path.exists(outside)
    assert not _accepted(listener)
    assert results["sleep_forever"].timed_out
    assert "MemoryError" in results["huge_allocation"].error
    assert "PermissionError" in results["write_outside"].error
    assert "fork" in results["fork_bomb"].error
    # no sandboxed process outlives its run
    time.sleep(0.2)
    alive = [p for p in os.listdir("/proc") if p.isdigit() and _is_runner(p)]
    assert alive == []


def _is_runner(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fastpeft-sandbox-result" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("isolation", TIERS)
def test_working_directory_is_writable_and_deleted(isolation):
    code = "import os\nopen('scratch.txt', 'w').write('ok')\ndef where():\n    return os.getcwd()\n"
    result = run_tests_in_sandbox(code, ["assert where() == 'nowhere'"], LIMITS, isolation)
    assert result.error is None
    workdir = re.match(r"got '(.*)'", result.outcomes[0]["detail"]).group(1)
    assert "fastpeft-sandbox-" in workdir and not os.path.exists(workdir)


def test_rlimit_nproc_stops_a_fork_bomb_without_the_audit_hook():
    # the rlimits tier runs a root trainer's child as nobody, so RLIMIT_NPROC binds
    code = "import os\nwhile True:\n    os.fork()\n" + GOOD
    result = run_tests_in_sandbox(code, TESTS, LIMITS, "rlimits", audit_hook=False)
    assert result.passed == 0 and result.wall_s < LIMITS.wall_time_s + 3.0
    assert result.timed_out or "BlockingIOError" in (result.error or "") or "Resource" in (result.error or "")


@NO_NAMESPACES
def test_namespaces_alone_block_network_and_outside_writes(tmp_path, listener):
    outside = str(tmp_path / "pwned.txt")
    port = listener.getsockname()[1]
    net = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + GOOD
    result = run_tests_in_sandbox(net, TESTS, LIMITS, "namespaces", audit_hook=False)
    assert result.passed == 0 and "OSError" in result.error  # no interface: "Network is unreachable"
    assert not _accepted(listener)
    write = f"open({outside!r}, 'w').write('x')\n" + GOOD
    result = run_tests_in_sandbox(write, TESTS, LIMITS, "namespaces", audit_hook=False)
    assert result.passed == 0 and "Read-only file system" in result.error
    assert not os.path.exists(outside)


def test_expected_values_never_reach_the_child():
    # a solution that knows nothing but the test expressions cannot fake answers
    cheat = ("import builtins\nbuiltins.bool = lambda x: True\nclass Any:\n    def __eq__(self, o): return True\n"
             "def add(a, b):\n    return Any()\n")  # fmt: skip
    assert run_tests_in_sandbox(cheat, TESTS + ["assert not add(0, 0)"], LIMITS).passed == 0
    case = parse_test("assert not is_prime(8)")
    assert (case.expr, case.expected, case.kind) == ("is_prime(8)", False, "truthy")
    assert parse_test("assert 5 == add(2, 3)").expr == "add(2, 3)"
    with pytest.raises(ValueError, match="literal"):
        parse_test("assert add(1, 2) == add(2, 1)")
    with pytest.raises(ValueError, match="single assert"):
        parse_test("x = 1")
