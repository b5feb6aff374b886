"""Syntax verifiers: Python code through ``ast`` and arithmetic formulas through a whitelisted parser.

Nothing here executes model-written code. Python is only parsed (``ast.parse`` compiles nothing).
Formulas are parsed with ``ast`` and then walked by our own evaluator, which knows a handful of node
types (numbers, names, + - * / // % **, unary signs, a few math functions) and refuses everything
else, so ``__import__('os')`` is a syntax error here, not a call. Numbers are exact fractions, so
``0.1 + 0.2 = 0.3`` is true.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Literal

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
# a run of formula characters around an "=" on one line (prose is trimmed off afterwards)
_EQUATION_SPAN = re.compile(r"[\w.()\s+\-*/^×÷%]*=[\w.()\s+\-*/^×÷%=]*")
_BINOPS: dict[type, Callable] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: None,  # handled with size guards
}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "log": math.log,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "min": min,
    "max": max,
}
_MAX_EXPONENT = 512  # beyond this a "formula" is an attempt to exhaust memory, not arithmetic


class FormulaError(ValueError):
    """A formula that does not parse, uses a forbidden construct, or cannot be evaluated."""


def check_python(code: str) -> str | None:
    """None when ``code`` parses as Python, else the error (``"line 3: invalid syntax"``)."""
    try:
        ast.parse(code)
    except SyntaxError as e:
        return f"line {e.lineno}: {e.msg}"
    except ValueError as e:  # e.g. source with NUL bytes
        return str(e)
    return None


def python_blocks(response: str) -> list[str]:
    """Fenced code blocks (```python ...```); without fences, the whole response is the code."""
    blocks = _FENCE.findall(response)
    return blocks if blocks else [response]


class PythonSyntaxVerifier:
    """Score = share of the response's Python code blocks that parse (1.0 or 0.0 for one block)."""

    def score(self, prompt: str, response: str) -> float:
        blocks = python_blocks(response)
        return sum(check_python(b) is None for b in blocks) / len(blocks)


def _normalise(formula: str) -> str:
    return formula.replace("^", "**").replace("×", "*").replace("÷", "/").strip()


def parse_expression(expression: str) -> ast.expr:
    """Parse one arithmetic expression and check every node against the whitelist."""
    try:
        tree = ast.parse(_normalise(expression), mode="eval")
    except SyntaxError as e:
        raise FormulaError(f"cannot parse {expression!r}: {e.msg}") from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load, ast.Name, ast.UAdd, ast.USub))
        ok = ok or type(node) in _BINOPS
        ok = ok or (isinstance(node, ast.Constant) and type(node.value) in (int, float))
        ok = ok or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS
            and not node.keywords
        )
        if not ok:
            raise FormulaError(f"{type(node).__name__} is not allowed in a formula: {expression!r}")
    return tree.body


def _split_equation(formula: str) -> list[str]:
    # "a = b = c" chains; "==", "<=", ">=" and "!=" are not equations here
    parts = re.split(r"(?<![=<>!])=(?!=)", formula)
    if any(not p.strip() for p in parts):
        raise FormulaError(f"empty side in equation {formula!r}")
    return parts


def parse_formula(formula: str) -> list[ast.expr]:
    """Parse an expression or an equation (``"2*x + 1 = 7"``) into one tree per side."""
    if not formula or not formula.strip():
        raise FormulaError("empty formula")
    return [parse_expression(p) for p in _split_equation(formula)]


def evaluate(node: ast.expr, variables: Mapping[str, Fraction | float] | None = None) -> Fraction | float:
    """Evaluate a whitelisted tree exactly (fractions) where possible; math functions give floats."""
    variables = variables or {}
    if isinstance(node, ast.Constant):
        return Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.Name):
        if node.id not in variables:
            raise FormulaError(f"unknown variable {node.id!r}")
        return variables[node.id]
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand, variables)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        a, b = evaluate(node.left, variables), evaluate(node.right, variables)
        try:
            if isinstance(node.op, ast.Pow):
                if abs(b) > _MAX_EXPONENT or abs(a) > 10**12:
                    raise FormulaError(f"power too large: {a} ** {b}")
                result = a**b
                return result if isinstance(result, (Fraction, float)) else float(result)
            return _BINOPS[type(node.op)](a, b)
        except ZeroDivisionError:
            raise FormulaError("division by zero") from None
    if isinstance(node, ast.Call):
        args = [float(evaluate(a, variables)) for a in node.args]
        try:
            return _FUNCTIONS[node.func.id](*args)
        except (ValueError, TypeError, OverflowError) as e:
            raise FormulaError(f"{node.func.id}{tuple(args)}: {e}") from None
    raise FormulaError(f"cannot evaluate {type(node).__name__}")


def _has_variables(node: ast.expr) -> bool:
    functions = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
    return any(isinstance(n, ast.Name) and id(n) not in functions for n in ast.walk(node))


def equation_holds(formula: str) -> bool | None:
    """True/False for an equation between numbers (``"3 + 4 = 7"``); None when it has variables
    or is not an equation. Raises :class:`FormulaError` if it does not parse."""
    sides = parse_formula(formula)
    if len(sides) < 2 or any(_has_variables(s) for s in sides):
        return None
    values = [evaluate(s) for s in sides]
    first = values[0]
    for v in values[1:]:
        if isinstance(first, Fraction) and isinstance(v, Fraction):
            if first != v:
                return False
        elif not math.isclose(float(first), float(v), rel_tol=1e-9, abs_tol=1e-12):
            return False
    return True


def find_equations(text: str) -> list[str]:
    """Equations written in free text, one per line at most, with surrounding prose trimmed.

    The run of formula characters around the "=" is shrunk from the left (dropping leading words
    such as "so the total is") and from the right until both sides parse; a span that never parses
    is returned as is, so the verifier counts it as malformed.
    """
    found = []
    for line in text.splitlines():
        line = re.sub(r"^\s*[A-Za-z][\w ]*?\d*\s*:", " ", line)  # "Step 2:" labels
        for m in _EQUATION_SPAN.finditer(line):
            span = m.group(0).strip()
            if "=" not in span:
                continue
            found.append(_trim_prose(span))
    return found


def _trim_prose(span: str) -> str:
    left, _, right = span.partition("=")
    lw, rw = left.split(), right.split()
    for i in range(len(lw)):
        lhs = " ".join(lw[i:])
        for j in range(len(rw), 0, -1):
            candidate = f"{lhs} = {' '.join(rw[:j])}"
            try:
                parse_formula(candidate)
            except FormulaError:
                continue
            return candidate
    return span


class FormulaVerifier:
    """Checks the equations a response writes down.

    ``check_values=True`` also requires equations between numbers to be true (``3 + 4 = 8`` fails).
    Score: with ``aggregate="mean"`` the share of equations that pass, with ``"all"`` 1.0 only if
    every one passes. A response without equations scores 1.0 (nothing to contradict).
    """

    def __init__(self, check_values: bool = True, aggregate: Literal["mean", "all"] = "mean") -> None:
        if aggregate not in ("mean", "all"):
            raise ValueError(f"aggregate must be 'mean' or 'all', got {aggregate!r}")
        self.check_values = check_values
        self.aggregate = aggregate

    def check(self, formula: str) -> bool:
        try:
            holds = equation_holds(formula)
        except FormulaError:
            return False
        return holds is not False or not self.check_values

    def score(self, prompt: str, response: str) -> float:
        equations = find_equations(response)
        if not equations:
            return 1.0
        passed = [self.check(e) for e in equations]
        if self.aggregate == "all":
            return float(all(passed))
        return sum(passed) / len(passed)
