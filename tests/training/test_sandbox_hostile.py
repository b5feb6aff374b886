"""Hostile programs against the real boundary (bubblewrap). Each one tries something a reward
hacker or an escaping program would; each test asserts that the side effect did not happen (seen
from the trainer's side: files, listeners, signals, processes) and that the reward is 0.

Every attack function returns evidence of success (leaked data, a success flag, a count beyond a
limit), and its test asserts exactly that evidence, so a reward above 0 would mean the attack
worked. All programs run at once (threads waiting on subprocesses) in one module fixture."""

import concurrent.futures
import ctypes
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fastpeft.training.rewards import sandbox_bwrap
from fastpeft.training.rewards.code_sandbox import CodeReward, SandboxLimits, run_tests_in_sandbox

LIMITS = SandboxLimits(wall_time_s=3.0, cpu_time_s=2, memory_mb=256, max_processes=16, max_file_mb=1, disk_mb=4)
SECRET = 918273645
HOSTILE = [
    "gc_search_for_expected_values",
    "patch_the_runner",
    "remount_and_write_outside",
    "write_outside",
    "new_user_namespace",
    "shell_out",
    "tcp_to_the_trainer",
    "internet_and_dns",
    "unix_socket_path",
    "unix_socket_abstract",
    "signal_the_trainer",
    "kill_everything",
    "read_trainer_environ",
    "read_trainer_memory",
    "read_shadow",
    "read_repo_and_home",
    "fork_bomb_counted",
    "fork_bomb_classic",
    "thread_bomb",
    "memory_bomb",
    "disk_bomb",
    "daemon_outlives_a_timeout",
    "daemon_outlives_an_exit",
    "forged_result_lines",
    "forged_value_objects",
    "fake_eq",
    "int_subclass_eq",
    "patched_builtins",
    "exit_early",
    "os_exit",
    "deep_json_line",
    "deep_value",
    "deep_recursion",
    "deep_directories",
    "output_flood",
    "cpu_spin",
    "sleep_forever",
]


def _sigusr1_counter():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    return received, previous


def _programs(ctx: dict) -> dict[str, tuple[str, list[str]]]:
    pid, out, tok = ctx["pid"], ctx["outside"], ctx["token"]
    prefix = os.path.realpath(sys.base_prefix)
    spawn_token = f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {tok!r}])\n"
    leak = "def leak():\n    try:\n        return {}\n    except Exception:\n        return None\n"
    return {
        "gc_search_for_expected_values": (
            """
import gc, re, sys
pattern = re.compile(r"leak\\(\\) *== *(\\d+)")  # the test's own text, if it ever reached this process
def leak():
    frame = sys._getframe()
    while frame is not None:
        found = pattern.search(repr(frame.f_locals)[:1_000_000])
        if found:
            return int(found.group(1))
        frame = frame.f_back
    for obj in gc.get_objects():
        try:
            found = pattern.search(repr(obj)[:100_000])
        except Exception:
            continue
        if found:
            return int(found.group(1))
    return 0
""",
            [f"assert leak() == {SECRET}"],
        ),
        "patch_the_runner": (
            """
import sys
main = sys.modules["__main__"]
main._encode = lambda *a, **k: {"tuple": []}
main.json.dumps = lambda *a, **k: '{"probe": 0, "passed": true}'
def answer():
    return 0
""",
            [f"assert answer() == {SECRET}"],
        ),
        "remount_and_write_outside": (
            f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_REMOUNT, MS_BIND, CLONE_NEWUSER, CLONE_NEWNS = 1, 32, 4096, 0x10000000, 0x20000
def attack():
    libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None)
    libc.mount(None, {prefix!r}.encode(), None, MS_REMOUNT | MS_BIND, None)
    libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)  # caps in a fresh user namespace...
    for target in (b"/", b"/usr/lib", {prefix!r}.encode()):
        libc.mount(None, target, None, MS_REMOUNT | MS_BIND, None)  # ...cannot unlock read-only mounts
    for path in ({prefix + "/pwned-" + tok!r}, "/usr/lib/pwned-{tok}", {out + "-remount"!r}):
        try:
            open(path, "w").write("x")
            return True
        except OSError:
            pass
    return False
""",
            ["assert attack() is True"],
        ),
        "new_user_namespace": (
            """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER = 0x10000000
def attack():  # a fresh user namespace would hold every capability inside it
    return libc.unshare(CLONE_NEWUSER) == 0
""",
            ["assert attack() is True"],
        ),
        "write_outside": (
            f"""
def attack():
    done = []
    for path in ({out!r}, {prefix + "/pwned-w-" + tok!r}, "/usr/lib/pwned-{tok}", "/root/pwned-{tok}",
                 "/pwned-{tok}", "/dev/pwned-{tok}", "/dev/shm/pwned-{tok}"):
        try:
            open(path, "w").write("x")
            done.append(path)
        except OSError:
            pass
    return done
""",
            ["assert attack() != []"],
        ),
        "shell_out": (
            f"""
import os, subprocess
def attack():
    os.system("touch {out}-shell")
    try:
        subprocess.run(["/bin/sh", "-c", "touch {out}-shell"], timeout=2)
        return True
    except OSError:
        return False
""",
            ["assert attack() is True"],
        ),
        "tcp_to_the_trainer": (
            f"""
import socket
def attack():
    try:
        socket.create_connection(("127.0.0.1", {ctx["tcp_port"]}), timeout=1).sendall(b"hi")
        return True
    except OSError:
        return False
""",
            ["assert attack() is True"],
        ),
        "internet_and_dns": (
            """
import socket
def attack():
    found = []
    for host, port in (("pypi.org", 443), ("151.101.0.223", 443), ("8.8.8.8", 53), ("10.0.2.2", 80)):
        try:
            socket.create_connection((host, port), timeout=1).close()
            found.append(host)
        except OSError:
            pass
    return found
""",
            ["assert attack() != []"],
        ),
        "unix_socket_path": (
            f"""
import socket
def attack():
    for path in ({ctx["unix_path"]!r}, "/run/systemd/private", "/var/run/docker.sock", "/tmp/.X11-unix/X0"):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            return path
        except OSError:
            pass
    return None
""",
            ["assert attack() is not None"],
        ),
        "unix_socket_abstract": (
            f"""
import socket
def attack():
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect({ctx["abstract"]!r})
        return True
    except OSError:
        return False
""",
            ["assert attack() is True"],
        ),
        "signal_the_trainer": (
            f"""
import os, signal
def attack():
    hits = 0
    for send in (lambda: os.kill({pid}, signal.SIGUSR1), lambda: os.killpg({pid}, signal.SIGUSR1),
                 lambda: signal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGUSR1)):
        try:
            send()
            hits += 1
        except OSError:
            pass
    os.kill(os.getppid(), signal.SIGUSR1)  # the sandbox's own init: harmless
    return hits
""",
            ["assert attack() > 0"],
        ),
        "kill_everything": (
            "import os, signal\nos.kill(-1, signal.SIGKILL)\ndef f():\n    return 0\n",
            ["assert f() == 1"],
        ),  # reaches only its own namespace: the neighbours still pass
        "read_trainer_environ": (
            leak.format(f"open('/proc/{pid}/environ', 'rb').read()"),
            ["assert leak() is not None"],
        ),
        "read_trainer_memory": (
            leak.format(f"(lambda f: (f.seek({ctx['address']}), f.read(16))[1])(open('/proc/{pid}/mem', 'rb'))"),
            ["assert leak() is not None"],
        ),
        "read_shadow": (leak.format("open('/etc/shadow').read()"), ["assert leak() is not None"]),
        "read_repo_and_home": (
            f"""
def leak():
    found = []
    for path in ({__file__!r}, {os.path.join(sys.prefix, "pyvenv.cfg")!r}, "/root/.bashrc", "/etc/passwd",
                 "/etc/hostname", {str(Path.home() / ".bash_history")!r}):
        try:
            found.append(open(path, "rb").read(100))
        except OSError:
            pass
    return found
""",
            ["assert leak() != []"],
        ),
        "fork_bomb_counted": (
            """
import os, sys
def bomb():
    n = 0
    try:
        while n < 10_000:
            if os.fork() == 0:
                SPAWN
            n += 1
    except OSError:
        pass
    return n
""".replace("SPAWN", spawn_token.strip()),
            [f"assert bomb() > {LIMITS.max_processes}"],
        ),
        "fork_bomb_classic": ("import os\nwhile True:\n    os.fork()\n", ["assert f() == 1"]),
        "thread_bomb": (
            """
import threading, time
def threads():
    n = 0
    try:
        while n < 10_000:
            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
            n += 1
    except RuntimeError:
        pass
    return n
""",
            [f"assert threads() > {LIMITS.max_processes}"],
        ),
        "memory_bomb": (
            """
def hog():
    try:
        bytearray(64 * 1024 ** 3)
        return 65536
    except MemoryError:
        pass
    chunks = []
    try:
        while True:
            chunks.append(bytearray(1024 * 1024))
    except MemoryError:
        return len(chunks)
""",
            [f"assert hog() > {LIMITS.memory_mb}"],
        ),
        "disk_bomb": (
            """
import os, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail with EFBIG instead of dying
def fill():
    total, i = 0, 0
    while total < 1024:
        try:
            with open(f"f{i}", "wb") as f:
                for _ in range(4):
                    f.write(b"x" * 256 * 1024)
                    total += 0.25
        except OSError:
            break
        i += 1
    return total
""",
            [f"assert fill() > {LIMITS.disk_mb}"],
        ),
        "daemon_outlives_a_timeout": (
            f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
{chr(10).join("        " + line for line in spawn_token.replace(tok, tok + "-t").splitlines())}
    os._exit(0)
time.sleep(1000)
""",
            ["assert f() == 1"],
        ),
        "daemon_outlives_an_exit": (
            f"""
import os, sys
def attack():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
{chr(10).join("            " + line for line in spawn_token.replace(tok, tok + "-e").splitlines())}
        os._exit(0)
    return "spawned"
""",
            ["assert attack() == 'the daemon outlived the run'"],
        ),
        "forged_result_lines": (
            """
import os
lines = ['{"loaded": true}', '{"probe": 0, "passed": true}', '{"probe": 0, "verdict": "passed"}',
         '{"probe": 0, "ok": true, "repr": "5"}', '\\x00fastpeft-sandbox-result\\x00{"results": [{"ok": true}]}',
         '{"done": true}']
for fd in range(1, 20):
    try:
        os.write(fd, ("\\n".join(lines) + "\\n").encode())
    except OSError:
        pass
os._exit(0)
""",
            ["assert add(2, 3) == 5"],
        ),
        "forged_value_objects": (
            """
import os
for fd in range(1, 20):
    try:
        os.write(fd, b'{"loaded": true}\\n{"probe": 0, "value": {"__eq__": true}}\\n'
                     b'{"probe": 1, "value": {"object": "Anything"}}\\n{"done": true}\\n')
    except OSError:
        pass
os._exit(0)
""",
            ["assert add(2, 3) == 5", "assert add(1, 1) == 2"],
        ),
        "fake_eq": (
            """
class Anything:
    __class__ = property(lambda self: int)  # isinstance(x, int) is True in the child
    def __eq__(self, o): return True
    def __ne__(self, o): return False
    def __lt__(self, o): return True
    def __gt__(self, o): return True
    def __bool__(self): return False
    def __contains__(self, o): return True
    def __sub__(self, o): return self
    def __abs__(self): return 0
    def __float__(self): return 12.566
    __hash__ = object.__hash__
def add(a, b):
    return Anything()
def area(r):
    return Anything()
""",
            [
                "assert add(2, 3) == 5",
                "assert math.isclose(area(2), 12.566, rel_tol=1e-3)",
                "assert abs(area(1) - 3.14) < 0.01",
                "assert isinstance(add(1, 2), int)",
                "assert 3 < add(2, 2) < 5",
                "assert not add(0, 0)",
                "assert 7 in [add(3, 4)]",
            ],
        ),
        "int_subclass_eq": (
            """
class Sneaky(int):
    def __eq__(self, o): return True
    __hash__ = int.__hash__
def add(a, b):
    return Sneaky(0)
""",
            ["assert add(2, 3) == 5", "assert [add(1, 1)] == [2]"],
        ),
        "patched_builtins": (
            """
import builtins, math, sys, operator, json
builtins.isinstance = lambda *a: True
builtins.abs = lambda x: 0
builtins.bool = lambda x=False: True
builtins.len = lambda x: 3
math.isclose = lambda *a, **k: True
operator.eq = lambda a, b: True
json.loads = lambda *a, **k: {"probe": 0, "value": 5}
sys.modules["math"] = type(sys)("math")
def add(a, b):
    return 0
def area(r):
    return 0.0
""",
            [
                "assert add(2, 3) == 5",
                "assert math.isclose(area(2), 12.566)",
                "assert abs(area(1) - 3.14) < 0.01",
                "assert isinstance(add(1, 2), str)",
                "assert len([add(1, 1)]) == 3",
                "assert add(0, 0) == 0 and add(1, 1) == 2",
            ],
        ),
        "exit_early": ("import sys\nsys.exit(0)\n", ["assert add(2, 3) == 5"]),
        "os_exit": ("import os\ndef add(a, b):\n    os._exit(0)\n", ["assert add(2, 3) == 5"]),
        "deep_json_line": (
            """
import os
deep = "[" * 200_000 + "]" * 200_000
for fd in range(1, 20):
    try:
        os.write(fd, ('{"loaded": true}\\n{"probe": 0, "value": ' + deep + '}\\n').encode())
    except OSError:
        pass
def add(a, b):
    return 0
""",
            ["assert add(2, 3) == 5"],
        ),
        "deep_value": (
            """
def add(a, b):
    v = []
    for _ in range(100_000):
        v = [v]
    return v
""",
            ["assert add(2, 3) != 5 and add(2, 3) == 5"],
        ),
        "deep_recursion": (
            """
import sys
sys.setrecursionlimit(10 ** 7)
def add(a, b):
    return add(a, b)
""",
            ["assert add(2, 3) == 5"],
        ),
        "deep_directories": (
            """
import os
def nest():
    n = 0
    try:
        while n < 100_000:
            os.mkdir("d")
            os.chdir("d")
            n += 1
    except OSError:
        pass
    return n
""",
            ["assert nest() == -1"],
        ),
        "output_flood": (
            """
import os
def add(a, b):
    chunk = b'{"probe": 0, "value": 5}\\n' * 40_000
    for fd in range(1, 20):
        try:
            for _ in range(100):
                os.write(fd, chunk)
        except OSError:
            pass
    return 0
""",
            ["assert add(2, 3) == 5"],
        ),
        "cpu_spin": ("while True:\n    pass\n", ["assert f() == 1"]),
        "sleep_forever": ("import time\ntime.sleep(1000)\n", ["assert f() == 1"]),
    }


def _processes_with(token: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def attacks(require_bwrap, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    token = f"fastpeft-hostile-{os.getpid()}-{time.time_ns()}"
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp / "trainer.sock"))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + token)
    secret = ctypes.create_string_buffer(b"trainer-memory-secret-" + token.encode())
    for s in (tcp, unix, abstract):
        s.listen()
        s.setblocking(False)
    ctx = {
        "pid": os.getpid(),
        "outside": str(tmp / "pwned"),
        "token": token,
        "tcp_port": tcp.getsockname()[1],
        "unix_path": str(tmp / "trainer.sock"),
        "abstract": "\0" + token,
        "address": ctypes.addressof(secret),
    }
    programs = _programs(ctx)
    assert sorted(programs) == sorted(HOSTILE)
    received, previous = _sigusr1_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(programs) + 1) as pool:
            futures = {
                name: pool.submit(run_tests_in_sandbox, code, tests, LIMITS) for name, (code, tests) in programs.items()
            }
            # an honest program in the middle of the bombs (generous wall time: the machine is busy)
            honest = pool.submit(
                run_tests_in_sandbox,
                "import os\ndef add(a, b):\n    return a + b\n",
                ["assert add(2, 3) == 5"],
                SandboxLimits(wall_time_s=60),
            )
            results = {name: f.result() for name, f in futures.items()}
            results["honest"] = honest.result()
        survivors = _processes_with(token)  # right after the runs: teardown is synchronous
        accepted = {}
        for name, s in (("tcp", tcp), ("unix", unix), ("abstract", abstract)):
            try:
                s.accept()
                accepted[name] = True
            except BlockingIOError:
                accepted[name] = False
    finally:
        signal.signal(signal.SIGUSR1, previous)
        for s in (tcp, unix, abstract):
            s.close()
    return {
        "results": results,
        "survivors": survivors,
        "accepted": accepted,
        "signals": len(received),
        "written": _written(ctx),
        "ctx": ctx,
    }


def _written(ctx: dict) -> list[str]:
    """Files the attacks would have created outside the sandbox (all carry the token or sit in tmp)."""
    tmp = Path(ctx["outside"]).parent
    found = sorted(str(p) for p in tmp.iterdir() if p.name != "trainer.sock")
    for where in (
        os.path.realpath(sys.base_prefix),
        "/usr/lib",
        "/",
        "/root",
        "/dev",
        "/dev/shm",
        tempfile.gettempdir(),
    ):
        found += [str(Path(where) / n) for n in os.listdir(where) if ctx["token"] in n] if os.path.isdir(where) else []
    return found


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_scores_zero(attacks, name):
    result = attacks["results"][name]
    assert result.passed == 0 and result.pass_rate == 0.0, (name, result.outcomes)
    assert result.isolation == "bwrap"
    assert result.wall_s < LIMITS.wall_time_s + 3.0, (name, result.wall_s)


def test_no_file_was_written_outside_the_sandbox(attacks):
    assert attacks["written"] == []


def test_no_connection_reached_the_trainer(attacks):
    assert attacks["accepted"] == {"tcp": False, "unix": False, "abstract": False}


def test_no_signal_reached_the_trainer(attacks):
    assert attacks["signals"] == 0


def test_an_honest_neighbour_is_unharmed(attacks):
    assert attacks["results"]["honest"].passed == 1, attacks["results"]["honest"].outcomes


def test_no_process_outlives_its_run(attacks):
    assert attacks["survivors"] == []
    # and the limits, not only the wall clock, stopped the bombs
    details = {
        n: attacks["results"][n].outcomes[0]["detail"]
        for n in ("fork_bomb_counted", "thread_bomb", "memory_bomb", "disk_bomb")
    }
    for name, detail in details.items():
        assert "assertion failed" in detail, (name, detail)


def test_time_limits_kill_spinners_and_sleepers(attacks):
    assert attacks["results"]["sleep_forever"].timed_out
    assert attacks["results"]["daemon_outlives_a_timeout"].timed_out
    spin = attacks["results"]["cpu_spin"]
    assert spin.timed_out or "without a result" in spin.error


def test_a_code_reward_survives_a_hostile_batch(attacks):
    """Through the reward API (threads, score_batch): every hostile completion is a 0.0, not None,
    and an honest completion in the same batch still gets its 1.0."""
    reward = CodeReward(LIMITS, max_workers=4)
    programs = _programs(attacks["ctx"])
    names = ["forged_result_lines", "fake_eq", "patched_builtins", "exit_early", "deep_json_line"]
    completions = [programs[n][0] for n in names] + ["def add(a, b):\n    return a + b\n"]
    records = [{"tests": programs[n][1]} for n in names] + [{"tests": ["assert add(2, 3) == 5"]}]
    assert reward.score_batch([""] * len(records), completions, records) == [0.0] * len(names) + [1.0]


@pytest.mark.skipif(os.geteuid() != 0, reason="the flat layout is for a root trainer")
def test_the_flat_layout_contains_them_too(attacks, monkeypatch):
    """A root trainer where unprivileged user namespaces are disabled gets one privileged bwrap with
    the runner dropped to uid 65534: the process limit, the read-only view and the namespaces hold."""
    monkeypatch.setattr(sandbox_bwrap, "_probe", lambda: ("flat", None))
    programs = _programs(attacks["ctx"])
    names = [
        "fork_bomb_counted",
        "write_outside",
        "read_shadow",
        "read_trainer_environ",
        "signal_the_trainer",
        "tcp_to_the_trainer",
        "unix_socket_abstract",
        "remount_and_write_outside",
        "disk_bomb",
    ]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        results = dict(zip(names, pool.map(lambda n: run_tests_in_sandbox(*programs[n], LIMITS), names)))
    for name, result in results.items():
        assert result.passed == 0, (name, result.outcomes)
    assert "assertion failed (bomb() = " in results["fork_bomb_counted"].outcomes[0]["detail"]
    assert _processes_with(attacks["ctx"]["token"]) == []
    assert _written(attacks["ctx"]) == []
