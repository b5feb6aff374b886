"""The parent's half of a code test: what the sandboxed child is asked, and the verdict on its answers.

A test ``assert math.isclose(area(2), 12.566, rel_tol=1e-3)`` is split here, in the trainer:
every maximal expression rooted at a name the candidate defines (``area(2)``, ``Solution().run(3)``,
``f(x)[0]``) is a *probe*, the only thing sent to the child; the rest of the assertion stays here
with the probes replaced by their values. The child returns plain data (see
:mod:`.sandbox_runner`), decoded strictly into builtin values, and the assertion is evaluated on
them in this process with Python's own semantics (``==``, ``isinstance``, chained comparisons,
``not``, ``in``, ``abs(a - b) < tol``, comprehensions over values, ...). So the child never sees
an expected value or a predicate, and nothing it prints, patches or overrides (``__eq__``,
builtins, ``sys.exit``, forged lines) can pass a test: the best it can do is answer.

The evaluation here runs trusted test text on untrusted *data*, with guards where data size drives
cost: ``**``, ``*``, ``<<``, ``%``-formatting, ``pow`` and ``range`` refuse results beyond
:data:`MAX_ITEMS` elements / digits, and ``math`` offers functions whose cost does not grow with
the argument's value, plus ``factorial``, ``comb`` and ``perm`` up to 100000. A probe that depends
on a comprehension or lambda variable (``all(f(i) == i * i for i in range(9))``) would need one
child call per iteration and is refused with a ValueError: write one assert per input.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from types import CodeType, SimpleNamespace
from typing import Any

MAX_ITEMS = 1_000_000  # elements (or decimal digits) a guarded operation may produce
MAX_DEPTH = 32  # nesting of a returned value
_SAFE_BUILTINS = (
    "abs",
    "all",
    "any",
    "ascii",
    "bin",
    "bool",
    "bytes",
    "callable",
    "chr",
    "complex",
    "dict",
    "divmod",
    "enumerate",
    "filter",
    "float",
    "format",
    "frozenset",
    "hash",
    "hex",
    "int",
    "isinstance",
    "issubclass",
    "iter",
    "len",
    "list",
    "map",
    "max",
    "min",
    "next",
    "oct",
    "ord",
    "repr",
    "reversed",
    "round",
    "set",
    "slice",
    "sorted",
    "str",
    "sum",
    "tuple",
    "type",
    "zip",
    "True",
    "False",
    "None",
)
_SAFE_MATH = (
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atan2",
    "atanh",
    "ceil",
    "copysign",
    "cos",
    "cosh",
    "degrees",
    "dist",
    "e",
    "erf",
    "erfc",
    "exp",
    "expm1",
    "fabs",
    "floor",
    "fmod",
    "frexp",
    "fsum",
    "gamma",
    "gcd",
    "hypot",
    "inf",
    "isclose",
    "isfinite",
    "isinf",
    "isnan",
    "isqrt",
    "ldexp",
    "lgamma",
    "log",
    "log10",
    "log1p",
    "log2",
    "modf",
    "nan",
    "pi",
    "pow",
    "prod",
    "radians",
    "remainder",
    "sin",
    "sinh",
    "sqrt",
    "tan",
    "tanh",
    "tau",
    "trunc",
)
_COUNTING_MATH = ("factorial", "comb", "perm")  # cost grows with the argument: guarded
_RESERVED = "__fp_"
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


class ProbeFailedError(Exception):
    """A probe had no value: it raised in the child, or the child never answered."""


@dataclasses.dataclass(frozen=True)
class CompiledTest:
    """One test: ``probes`` go to the child; ``code`` (or ``expected`` for a pair) judges here."""

    source: str
    probes: tuple[str, ...]
    code: CodeType | None = None  # the assertion, probes replaced by __fp_probe(i)
    expected: Any = None  # for an ("expr", expected) pair


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _bound_names(tree: ast.AST) -> set[str]:
    """Names bound inside the assertion itself (comprehension targets, lambda arguments, walrus)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.comprehension):
            names |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Lambda):
            names |= {a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)}
            names |= {a.arg for a in (node.args.vararg, node.args.kwarg) if a is not None}
        elif isinstance(node, ast.NamedExpr):
            names.add(node.target.id)
    return names


_GUARDED_OPS = {ast.Pow: "pow", ast.Mult: "mul", ast.LShift: "lshift", ast.Mod: "mod"}


class _Splitter(ast.NodeTransformer):
    def __init__(self, source: str, local: set[str]):
        self.source, self.local, self.probes = source, local, []
        self.parent_names = set(_SAFE_BUILTINS) | {"math"}

    def visit(self, node: ast.AST) -> ast.AST:
        if isinstance(node, ast.expr) and not isinstance(node, ast.Starred):
            root = _root_name(node)
            if root is not None and root not in self.parent_names and root not in self.local:
                return self._probe(node)
        node = self.generic_visit(node)
        if isinstance(node, ast.BinOp) and type(node.op) in _GUARDED_OPS:
            return ast.Call(
                ast.Name("__fp_guard", ast.Load()),
                [ast.Constant(_GUARDED_OPS[type(node.op)]), node.left, node.right],
                [],
            )
        return node

    def _probe(self, node: ast.expr) -> ast.expr:
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & self.local
        if used:
            raise ValueError(
                f"test {self.source!r}: {ast.unparse(node)} depends on the loop or lambda variable(s) "
                f"{sorted(used)}; write one assert per input"
            )
        self.probes.append(ast.unparse(node))
        return ast.Call(ast.Name("__fp_probe", ast.Load()), [ast.Constant(len(self.probes) - 1)], [])


def compile_test(test: str | tuple[str, Any]) -> CompiledTest:
    """``"assert <expression>"`` (any expression; see the module docstring), or a pair
    ``("f(2)", 4)``: the value of ``f(2)`` must equal 4 (floats with relative tolerance 1e-9).
    ValueError/TypeError naming the test when it cannot be used."""
    if isinstance(test, tuple):
        if len(test) != 2 or not isinstance(test[0], str):
            raise ValueError(f"a test pair must be (expression, expected value), got {test!r}")
        try:
            ast.parse(test[0], mode="eval")
        except SyntaxError as err:
            raise ValueError(f"test {test!r}: expression does not parse: {err.msg}") from None
        return CompiledTest(repr(test), (test[0].strip(),), expected=test[1])
    if not isinstance(test, str):
        raise TypeError(f"a test must be a str or an (expression, expected) pair, got {type(test).__name__}")
    try:
        tree = ast.parse(test.strip())
    except SyntaxError as err:
        raise ValueError(f"test {test!r} does not parse: {err.msg}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise ValueError(f"test {test!r} must be a single assert statement")
    expr = tree.body[0].test
    if any(isinstance(n, ast.Name) and n.id.startswith(_RESERVED) for n in ast.walk(expr)):
        raise ValueError(f"test {test!r}: names starting with {_RESERVED!r} are reserved")
    splitter = _Splitter(test, _bound_names(expr))
    body = ast.fix_missing_locations(ast.Expression(splitter.visit(expr)))
    return CompiledTest(test, tuple(splitter.probes), code=compile(body, "<test>", "eval"))


# ----------------------------------------------------------------------------------- child's answers
class _Iterated:
    """An iterator the candidate returned, materialised by the child: iterable once, unequal to
    lists and tuples, without ``len`` (as the generator itself would be)."""

    def __init__(self, items: list[Any]):
        self._it = iter(items)

    def __iter__(self) -> _Iterated:
        return self

    def __next__(self) -> Any:
        return next(self._it)


def _decode(data: Any) -> Any:
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [_decode(x) for x in data]
    if type(data) is not dict or len(data) != 1:
        raise ValueError("not an encoded value")
    ((tag, body),) = data.items()
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(*body)
    if type(body) is not list:
        raise ValueError("not an encoded value")
    if tag == "dict":
        if not all(type(kv) is list and len(kv) == 2 for kv in body):
            raise ValueError("not an encoded dict")
        return {_decode(k): _decode(v) for k, v in body}
    makers = {"tuple": tuple, "set": set, "frozenset": frozenset, "iter": _Iterated}
    if tag not in makers:
        raise ValueError(f"unknown tag {tag!r}")
    return makers[tag]([_decode(x) for x in body])


def _nesting(text: str) -> int:
    """Bracket depth of a JSON text, without parsing it (and so without recursion)."""
    brackets = re.findall(r"[\[\]{}]", _JSON_STRING.sub('""', text))
    return max(itertools.accumulate(1 if b in "[{" else -1 for b in brackets), default=0)


def read_answers(lines: Sequence[bytes], n_probes: int) -> tuple[str | None, dict[int, Any], dict[int, str], bool]:
    """``(load_error, values, errors, loaded)`` from the child's lines. Lines that are not the
    protocol's (forged, torn, too deep, undecodable) are ignored; the first answer per probe wins."""
    load_error, values, errors, loaded = None, {}, {}, False
    for raw in lines:
        try:
            text = raw.decode("utf-8")
            if _nesting(text) > 2 * MAX_DEPTH + 4:  # a tagged container is two JSON levels
                continue
            record = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError, MemoryError):
            continue
        if type(record) is not dict:
            continue
        if record.get("loaded") is True:
            loaded = True
        elif type(record.get("load_error")) is str and not loaded:
            load_error = load_error or record["load_error"][:300]
        i = record.get("probe")
        if type(i) is not int or not 0 <= i < n_probes or i in values or i in errors:
            continue
        if "value" in record:
            try:
                values[i] = _decode(record["value"])
            except (ValueError, TypeError, RecursionError, MemoryError):
                errors[i] = "the returned value could not be decoded"
        elif type(record.get("error")) is str:
            errors[i] = record["error"][:300]
    return load_error, values, errors, loaded


# --------------------------------------------------------------------------------------- verdicts
def _check_size(n: int) -> None:
    if n > MAX_ITEMS:
        raise OverflowError(f"the test would build more than {MAX_ITEMS} items from the candidate's values")


def _digits(x: Any) -> int:
    return abs(x).bit_length() * 0.302 if isinstance(x, int) else 1


def _guard(op: str, a: Any, b: Any) -> Any:
    if op == "pow":
        if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
            _check_size(int(_digits(a) * b))
        return a**b
    if op == "lshift":
        if isinstance(b, int):
            _check_size(int(_digits(a) + b * 0.302))
        return a << b
    if op == "mul":
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                _check_size(len(seq) * n)
        return a * b
    if isinstance(a, (str, bytes)):  # %-formatting: a width or precision from the data
        args = b if isinstance(b, tuple) else (b,)
        for x in args:
            if isinstance(x, int) and abs(x) > MAX_ITEMS:
                raise OverflowError("a %-format argument is too large")
    return a % b


def _guarded_pow(a: Any, b: Any, mod: Any = None) -> Any:
    return pow(a, b, mod) if mod is not None else _guard("pow", a, b)


def _guarded_range(*args: int) -> range:
    r = range(*args)
    _check_size(len(r))
    return r


def _guarded_counting(name: str) -> Any:
    fn = getattr(math, name)

    def guarded(*args: Any) -> Any:
        if any(isinstance(a, int) and a > 100_000 for a in args):
            raise OverflowError(f"math.{name} of more than 100000 is refused here")
        return fn(*args)

    return guarded


_NAMESPACE: dict[str, Any] = {
    "__builtins__": {**{n: getattr(builtins, n) for n in _SAFE_BUILTINS}, "pow": _guarded_pow, "range": _guarded_range},
    "math": SimpleNamespace(
        **{n: getattr(math, n) for n in _SAFE_MATH}, **{n: _guarded_counting(n) for n in _COUNTING_MATH}
    ),
    "__fp_guard": _guard,
}


def _equal(a: Any, b: Any) -> bool:
    """Equality for ("expr", expected) pairs: floats with relative tolerance 1e-9."""
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError, OverflowError):
            return False
    if type(a) in (list, tuple) and type(b) in (list, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def judge(test: CompiledTest, values: Mapping[int, Any], errors: Mapping[int, str]) -> tuple[bool, str]:
    """Evaluate ``test`` on the probes' values (indices local to the test): ``(passed, detail)``.
    Never raises: any failure to evaluate is a failed test."""

    def probe(i: int) -> Any:
        if i in values:
            return values[i]
        raise ProbeFailedError(f"{test.probes[i]} {'raised ' + errors[i] if i in errors else 'gave no result'}")

    try:
        if test.code is None:
            ok = _equal(probe(0), test.expected)
        else:
            ok = bool(eval(test.code, {**_NAMESPACE, "__fp_probe": probe}))  # trusted test text, untrusted data
    except ProbeFailedError as err:
        return False, str(err)[:300]
    except Exception as err:  # a test that raises fails, as under pytest
        return False, f"{type(err).__name__}: {str(err)[:200]}"
    if ok:
        return True, "passed"
    shown = ", ".join(f"{p} = {_short(values[i])}" for i, p in enumerate(test.probes) if i in values)
    return False, f"assertion failed ({shown})" if shown else "assertion failed"


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a huge int refuses repr
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."
