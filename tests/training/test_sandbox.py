"""The code sandbox: how tests are split between child and parent, the parent's verdicts, the
boundary's properties as seen from inside, the refusal without bubblewrap, and the unsafe tier.
Hostile programs are in test_sandbox_hostile.py."""

import math
import os
import time

import pytest

from fastpeft.training.rewards import code_sandbox, sandbox_bwrap
from fastpeft.training.rewards.code_sandbox import (
    UNSAFE,
    CodeReward,
    SandboxLimits,
    SandboxUnavailableError,
    run_tests_in_sandbox,
)
from fastpeft.training.rewards.sandbox_process import remove_tree
from fastpeft.training.rewards.sandbox_verdict import compile_test, judge, read_answers

LIMITS = SandboxLimits(wall_time_s=5.0, cpu_time_s=2, memory_mb=256, max_processes=16, max_file_mb=1, disk_mb=4)
GOOD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]


@pytest.mark.parametrize(
    "test, probes",
    [
        ("assert math.isclose(area(2), 12.566, rel_tol=1e-3)", ["area(2)"]),
        ("assert abs(f(1) - 0.5) < 1e-6", ["f(1)"]),
        ("assert isinstance(f(3), int)", ["f(3)"]),
        ("assert 1 < f(2) < 3", ["f(2)"]),
        ("assert not is_prime(8)", ["is_prime(8)"]),
        ("assert 3 in f(5) and 4 not in f(5)", ["f(5)", "f(5)"]),
        ("assert Solution().run([1, 2])[0] == 1", ["Solution().run([1, 2])[0]"]),
        ("assert [v % 2 for v in f(4)] == [0, 1, 0, 1]", ["f(4)"]),
        ("assert sorted(f(x), reverse=True) == [2, 1]", ["f(x)"]),
        ("assert 5 == add(2, 3)", ["add(2, 3)"]),
        (("f(2)", 4), ["f(2)"]),
    ],
)
def test_only_candidate_expressions_go_to_the_child(test, probes):
    compiled = compile_test(test)
    assert list(compiled.probes) == probes
    # no expected value, comparison or judging call is among what the child evaluates
    for probe in compiled.probes:
        assert not any(token in probe for token in ("==", "<", "isclose", "isinstance", "abs(", "12.566", "not "))


@pytest.mark.parametrize(
    "test, match",
    [
        ("assert all(f(i) == i * i for i in range(9))", "loop or lambda"),
        ("assert list(map(lambda t: f(t), [1]))", "loop or lambda"),
        ("x = 1", "single assert"),
        ("assert f(", "does not parse"),
        ("assert __fp_probe(0)", "reserved"),
    ],
)
def test_unusable_tests_are_refused_naming_the_test(test, match):
    with pytest.raises(ValueError, match=match):
        compile_test(test)
    with pytest.raises(TypeError):
        compile_test(3)


def _answers(*records: str) -> tuple:
    return read_answers([r.encode() for r in ('{"loaded": true}', *records)], 8)


@pytest.mark.parametrize(
    "test, value, passes",
    [
        ("assert math.isclose(area(2), 12.566, rel_tol=1e-3)", "12.5664", True),
        ("assert math.isclose(area(2), 12.566, rel_tol=1e-3)", "3.0", False),
        ("assert abs(f(1) - 0.5) < 1e-6", "0.5", True),
        ("assert abs(f(1) - 0.5) < 1e-6", '"0.5"', False),  # str - float raises: a failed test
        ("assert isinstance(f(3), int)", "true", True),  # bool is an int, as in Python
        ("assert isinstance(f(3), tuple)", "[1]", False),
        ("assert isinstance(f(3), tuple)", '{"tuple": [1]}', True),
        ("assert 1 < f(2) < 3", "2", True),
        ("assert 1 < f(2) < 3", "3", False),
        ("assert not is_prime(8)", "false", True),
        ("assert not is_prime(8)", '{"set": [0]}', False),
        ("assert f(5) == {1: 'a'}", '{"dict": [[1, "a"]]}', True),
        ("assert f(5) == {1, 2}", '{"frozenset": [2, 1]}', True),
        ("assert f(5) == b'ab'", '{"bytes": "6162"}', True),
        ("assert f(5) == 1 + 2j", '{"complex": [1.0, 2.0]}', True),
        ("assert list(gen(3)) == [0, 1, 2]", '{"iter": [0, 1, 2]}', True),
        ("assert gen(3) == [0, 1, 2]", '{"iter": [0, 1, 2]}', False),  # a generator is not a list
        ("assert f(1) is None", "null", True),
        ("assert 2 ** f(1) > 0", "1000000000000", False),  # guarded, not computed
        ("assert len([0] * f(1)) > 0", "1000000000000", False),
        ("assert sum(range(f(1))) > 0", "1000000000000", False),
        ("assert f(5) == math.factorial(5)", "120", True),
        ("assert math.factorial(f(1)) > 0", "1000000000", False),
    ],
)
def test_the_parent_judges_values_with_python_semantics(test, value, passes):
    load_error, values, errors, loaded = _answers(f'{{"probe": 0, "value": {value}}}', '{"done": true}')
    assert loaded and load_error is None and 0 in values
    start = time.perf_counter()
    ok, detail = judge(compile_test(test), values, errors)
    assert ok is passes, detail
    assert time.perf_counter() - start < 1.0


def test_probe_errors_and_missing_answers_fail_only_where_needed():
    test = compile_test("assert f(0) == 0 or g(1) == 1")
    assert judge(test, {0: 0}, {1: "ZeroDivisionError: x"}) == (True, "passed")  # `or` short-circuits
    ok, detail = judge(test, {0: 5}, {1: "ZeroDivisionError: x"})
    assert not ok and "g(1) raised ZeroDivisionError" in detail
    ok, detail = judge(compile_test("assert f(0) == 0"), {}, {})
    assert not ok and "gave no result" in detail


def test_hostile_answer_lines_are_ignored_without_raising():
    deep = "[" * 200_000 + "]" * 200_000
    lines = [
        b"\xff\xfe not utf-8",
        deep.encode(),
        f'{{"probe": 0, "value": {deep}}}'.encode(),
        b'{"probe": 1, "value": {"set": [[1]]}}',
        b'{"probe": 2, "value": {"evil": 1}}',
        b'{"probe": 3, "value": ' + b"9" * 5000 + b"}",
        b'{"probe": 99, "value": 1}',
        b"[1, 2]",
        b'{"probe": 4, "value": 1}',
        b'{"probe": 4, "value": 2}',
        b'{"probe": 5, "passed": true}',
    ]
    load_error, values, errors, loaded = read_answers(lines, 6)
    assert not loaded and load_error is None
    assert values == {4: 1}  # the first answer wins; the rest is not an answer
    assert set(errors) == {1, 2}


def test_remove_tree_handles_directories_nested_deeper_than_the_recursion_limit(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(1200):  # shutil.rmtree raises RecursionError here; created relative to open directories
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    os.close(fd)
    remove_tree(str(root))
    assert not root.exists()


def test_limits_are_validated():
    for bad in ({"wall_time_s": 0}, {"memory_mb": -1}, {"cpu_time_s": math.nan}, {"disk_mb": True}):
        with pytest.raises(ValueError, match="SandboxLimits"):
            SandboxLimits(**bad)
    with pytest.raises(ValueError, match="isolation must be"):
        run_tests_in_sandbox(GOOD, TESTS, LIMITS, "namespaces")


def test_without_bubblewrap_code_rewards_refuse_in_one_line(monkeypatch):
    monkeypatch.setattr(sandbox_bwrap, "find_bwrap", lambda: None)
    sandbox_bwrap._probe.cache_clear()
    try:
        with pytest.raises(SandboxUnavailableError) as err:
            CodeReward(LIMITS)
        message = str(err.value)
        assert "\n" not in message and "apt-get install bubblewrap" in message and UNSAFE in message
        with pytest.raises(SandboxUnavailableError):
            run_tests_in_sandbox(GOOD, TESTS, LIMITS)
    finally:
        sandbox_bwrap._probe.cache_clear()


def test_unsafe_tier_is_loud_limited_and_cleans_up():
    code_sandbox._warn_unsafe.cache_clear()
    with pytest.warns(RuntimeWarning, match="NOT isolated"):
        reward = CodeReward(LIMITS, isolation=UNSAFE)
    assert reward("p", GOOD, {"tests": TESTS}) == 1.0
    # the working directory goes, even nested far beyond the recursion limit
    deep = (
        "import os\nhome = os.getcwd()\nfor _ in range(1200):\n    os.mkdir('d')\n    os.chdir('d')\n"
        "def where():\n    return home\n"
    )
    result = run_tests_in_sandbox(deep, ["assert where() == ''"], LIMITS, UNSAFE)
    workdir = result.outcomes[0]["detail"].split("where() = '")[1].rstrip("')")
    assert "fastpeft-sandbox-" in workdir and not os.path.exists(workdir)
    # the verdict is still made here: a fake __eq__ gains nothing
    cheat = "class Any:\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return Any()\n"
    assert run_tests_in_sandbox(cheat, TESTS, LIMITS, UNSAFE).passed == 0
    slow = run_tests_in_sandbox("import time\ntime.sleep(60)\n" + GOOD, TESTS, SandboxLimits(wall_time_s=0.5), UNSAFE)
    assert slow.timed_out and slow.passed == 0 and slow.wall_s < 5


def test_good_code_passes_and_wrong_code_fails(require_bwrap):
    result = run_tests_in_sandbox(GOOD, [*TESTS, "assert add(1, 1) == 3"], LIMITS)
    assert (result.passed, result.total, result.error, result.isolation) == (2, 3, None, "bwrap")
    assert result.outcomes[2]["detail"] == "assertion failed (add(1, 1) = 2)"
    reward = CodeReward(LIMITS)
    assert reward("p", f"Here you go:\n```python\n{GOOD}```", {"tests": TESTS}) == 1.0
    assert reward("p", "def add(a, b):\n    return a * b + 1\n", {"tests": TESTS}) == 0.5  # 7 != 5, 0 == 0
    assert CodeReward(LIMITS, partial=False)("p", "def add(a, b):\n    return a * b + 1\n", {"tests": TESTS}) == 0.0
    broken = run_tests_in_sandbox("def add(a, b) return", TESTS, LIMITS)
    assert broken.passed == 0 and "SyntaxError" in broken.error


def test_correct_solutions_using_the_standard_library_pass(require_bwrap):
    code = """
import bisect, collections, dataclasses, datetime, decimal, fractions, functools, hashlib, heapq, itertools
import json, math, operator, random, re, statistics, string, struct, textwrap, typing, unicodedata
Point = collections.namedtuple("Point", "x y")

def top_k(xs, k):
    return heapq.nlargest(k, xs)

def word_counts(text):
    return collections.Counter(re.findall(r"[a-z]+", text.lower()))

def pairs(n):
    return itertools.combinations(range(n), 2)

def mean_exact(xs):
    return float(statistics.fmean(xs)), str(fractions.Fraction(1, 3) + fractions.Fraction(1, 6))

def digest(s):
    return hashlib.sha256(s.encode()).hexdigest()[:8]

def weekday(y, m, d):
    return datetime.date(y, m, d).strftime("%A")

def shuffled(n, seed):
    rng = random.Random(seed)
    xs = list(range(n))
    rng.shuffle(xs)
    return sorted(xs)

def origin():
    return Point(0, 0)

def insert_sorted(xs, x):
    bisect.insort(xs, x)
    return xs

def packed(v):
    return struct.unpack("<I", struct.pack("<I", v))[0]

def money(a, b):
    return str(decimal.Decimal(a) + decimal.Decimal(b))
"""
    tests = [
        "assert top_k([3, 1, 4, 1, 5], 2) == [5, 4]",
        "assert word_counts('a b a') == {'a': 2, 'b': 1}",
        "assert list(pairs(3)) == [(0, 1), (0, 2), (1, 2)]",
        "assert mean_exact([1, 2]) == (1.5, '1/2')",
        "assert digest('abc') == 'ba7816bf'",
        "assert weekday(2024, 1, 1) == 'Monday'",
        "assert shuffled(5, 0) == [0, 1, 2, 3, 4]",
        "assert origin() == (0, 0)",
        "assert insert_sorted([1, 3], 2) == [1, 2, 3]",
        "assert packed(7) == 7",
        "assert money('0.1', '0.2') == '0.3'",
        "assert isinstance(word_counts(''), dict)",
    ]
    result = run_tests_in_sandbox(code, tests, LIMITS)
    assert result.passed == len(tests), [o for o in result.outcomes if not o["passed"]]


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the flat layout is for a root trainer")


@pytest.mark.parametrize("layout", ["probed", pytest.param("flat", marks=ROOT_ONLY)])
def test_the_boundary_as_seen_from_inside(require_bwrap, layout, monkeypatch):
    if layout == "flat":  # what a root trainer gets where unprivileged user namespaces are disabled
        monkeypatch.setattr(sandbox_bwrap, "_probe", lambda: ("flat", None))
    code = """
import os, resource, socket
def uid():
    return os.getuid(), os.getgid(), os.getgroups()
def pid():
    return os.getpid()
def host():
    return socket.gethostname()
def root():
    return sorted(os.listdir("/"))
def workdir():
    st = os.statvfs(os.getcwd())
    return os.getcwd(), st.f_blocks * st.f_frsize
def limits():
    return [resource.getrlimit(getattr(resource, n))[0] for n in
            ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")]
def can_become_root():
    try:
        os.setuid(0)
        return True
    except OSError:  # EINVAL: uid 0 does not exist in the user namespace
        return False
def env():
    return sorted(os.environ)
def interfaces():
    return [name for _, name in socket.if_nameindex()]
"""
    mib = 1024 * 1024
    tests = [
        "assert uid() == (65534, 65534, [])",
        "assert pid() < 10",  # pid namespace
        "assert host() == 'sandbox'",  # uts namespace
        "assert 'proc' not in root() and 'etc' not in root() and 'home' not in root()",
        "assert set(root()) <= {'dev', 'lib', 'lib32', 'lib64', 'libx32', 'root', 'tmp', 'usr', 'opt'}",
        f"assert workdir() == ('/tmp', {LIMITS.disk_mb * mib})",
        f"assert limits() == [2, {256 * mib}, 16, {mib}, 64, 0]",
        "assert not can_become_root()",
        "assert env() == ['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']",
        "assert interfaces() == ['lo']",
    ]
    result = run_tests_in_sandbox(code, tests, LIMITS)
    assert result.passed == len(tests), [o for o in result.outcomes if not o["passed"]]
