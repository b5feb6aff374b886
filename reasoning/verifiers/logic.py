"""Propositional consistency: parse statements, convert to clauses, decide with DPLL.

Statements use words or symbols: ``not/~/!/¬``, ``and/&/∧``, ``or/|/∨``, ``->/=>/implies/→``,
``<->/<=>/iff/↔``, parentheses, ``true``/``false``; precedence not > and > or > -> > <->, with ``->``
right-associative. An atom is a run of other words, so "it rains -> the ground is wet" has two atoms
(case-insensitive). The set of statements is converted to CNF with the Tseitin encoding (one fresh
variable per connective, so the clause count stays linear in the statement size) and handed to a
DPLL solver with unit propagation and pure-literal elimination.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

Formula = tuple  # ("var", name) | ("const", bool) | ("not", f) | (op, f, g) with op in and/or/imp/iff
Clause = list[int]

_SYMBOLS = [
    ("<->", "iff"),
    ("<=>", "iff"),
    ("↔", "iff"),
    ("->", "imp"),
    ("=>", "imp"),
    ("→", "imp"),
    ("&&", "and"),
    ("||", "or"),
    ("&", "and"),
    ("∧", "and"),
    ("|", "or"),
    ("∨", "or"),
    ("~", "not"),
    ("!", "not"),
    ("¬", "not"),
    ("(", "("),
    (")", ")"),
]
_WORDS = {"not": "not", "and": "and", "or": "or", "implies": "imp", "iff": "iff", "true": "true", "false": "false"}
_TOKEN = re.compile(r"\s*(<->|<=>|->|=>|&&|\|\||[&|~!()¬∧∨→↔]|[A-Za-z0-9_']+)")


class LogicParseError(ValueError):
    """A statement that is not a propositional formula."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise LogicParseError(f"unexpected character {text[pos]!r} at {pos} in {text!r}")
        tok = m.group(1)
        pos = m.end()
        kind = dict(_SYMBOLS).get(tok) or _WORDS.get(tok.lower())
        if kind is None:
            if out and out[-1][0] == "atom":  # consecutive words form one atom
                out[-1] = ("atom", f"{out[-1][1]} {tok.lower()}")
                continue
            out.append(("atom", tok.lower()))
        else:
            out.append((kind, tok))
    return out


def parse_statement(text: str) -> Formula:
    """Parse one statement into a formula tree; raises :class:`LogicParseError`."""
    toks = _tokens(text)
    if not toks:
        raise LogicParseError("empty statement")
    pos = 0

    def peek() -> str | None:
        return toks[pos][0] if pos < len(toks) else None

    def take(kind: str) -> None:
        nonlocal pos
        if peek() != kind:
            raise LogicParseError(f"expected {kind!r} at token {pos} in {text!r}")
        pos += 1

    def binary(next_level, kind: str, right_assoc: bool = False):
        def parse() -> Formula:
            left = next_level()
            while peek() == kind:
                take(kind)
                right = parse() if right_assoc else next_level()
                left = (kind, left, right)
                if right_assoc:
                    break
            return left

        return parse

    def unary() -> Formula:
        nonlocal pos
        kind = peek()
        if kind == "not":
            take("not")
            return ("not", unary())
        if kind == "(":
            take("(")
            inner = iff()
            take(")")
            return inner
        if kind in ("true", "false"):
            pos += 1
            return ("const", kind == "true")
        if kind == "atom":
            pos += 1
            return ("var", toks[pos - 1][1])
        raise LogicParseError(f"expected a statement at token {pos} in {text!r}")

    iff = binary(binary(binary(binary(unary, "and"), "or"), "imp", right_assoc=True), "iff")
    tree = iff()
    if pos != len(toks):
        raise LogicParseError(f"unexpected {toks[pos][1]!r} at token {pos} in {text!r}")
    return tree


def to_clauses(formulas: Iterable[Formula]) -> tuple[list[Clause], dict[str, int]]:
    """Tseitin CNF of the conjunction of ``formulas``; returns clauses and the atom -> variable map."""
    atoms: dict[str, int] = {}
    clauses: list[Clause] = []
    counter = [0]

    def fresh() -> int:
        counter[0] += 1
        return counter[0]

    def encode(f: Formula) -> int:
        kind = f[0]
        if kind == "var":
            if f[1] not in atoms:
                atoms[f[1]] = fresh()
            return atoms[f[1]]
        v = fresh()
        if kind == "const":
            clauses.append([v] if f[1] else [-v])
        elif kind == "not":
            a = encode(f[1])
            clauses.extend([[-v, -a], [v, a]])
        else:
            a, b = encode(f[1]), encode(f[2])
            if kind == "and":
                clauses.extend([[-v, a], [-v, b], [v, -a, -b]])
            elif kind == "or":
                clauses.extend([[-v, a, b], [v, -a], [v, -b]])
            elif kind == "imp":
                clauses.extend([[-v, -a, b], [v, a], [v, -b]])
            else:  # iff
                clauses.extend([[-v, -a, b], [-v, a, -b], [v, a, b], [v, -a, -b]])
        return v

    for f in formulas:
        clauses.append([encode(f)])
    return clauses, atoms


def dpll(clauses: Sequence[Sequence[int]]) -> dict[int, bool] | None:
    """A satisfying assignment (variable -> value) of CNF ``clauses`` (DIMACS-style ints), or None.

    An empty clause is unsatisfiable; an empty clause set is satisfied by the empty assignment.
    Variables the search never needed are absent from the assignment.
    """
    for c in clauses:
        if any(not isinstance(x, int) or x == 0 for x in c):
            raise ValueError(f"clause literals must be non-zero ints, got {list(c)}")
    return _dpll([list(c) for c in clauses], {})


def _simplify(clauses: list[Clause], lit: int) -> list[Clause] | None:
    out = []
    for c in clauses:
        if lit in c:
            continue
        reduced = [x for x in c if x != -lit]
        if not reduced:
            return None  # conflict
        out.append(reduced)
    return out


def _dpll(clauses: list[Clause], assignment: dict[int, bool]) -> dict[int, bool] | None:
    assignment = dict(assignment)
    while True:  # unit propagation, then pure literals, until nothing changes
        if any(not c for c in clauses):
            return None
        unit = next((c[0] for c in clauses if len(c) == 1), None)
        if unit is None:
            literals = {x for c in clauses for x in c}
            unit = next((x for x in sorted(literals, key=abs) if -x not in literals), None)
        if unit is None:
            break
        assignment[abs(unit)] = unit > 0
        simplified = _simplify(clauses, unit)
        if simplified is None:
            return None
        clauses = simplified
    if not clauses:
        return assignment
    # branch on a literal of the shortest clause (most constrained first)
    lit = min(clauses, key=len)[0]
    for choice in (lit, -lit):
        simplified = _simplify(clauses, choice)
        if simplified is not None:
            result = _dpll(simplified, {**assignment, abs(choice): choice > 0})
            if result is not None:
                return result
    return None


def consistent(statements: Iterable[str]) -> tuple[bool, dict[str, bool] | None]:
    """Whether the statements can all hold at once, and a witness (atom -> truth value) if so."""
    clauses, atoms = to_clauses(parse_statement(s) for s in statements)
    model = dpll(clauses)
    if model is None:
        return False, None
    return True, {name: model.get(v, False) for name, v in atoms.items()}


def extract_statements(text: str) -> list[str]:
    """Lines and sentences of ``text`` that parse as propositional statements."""
    out = []
    for piece in re.split(r"[\n;]|(?<=\.)\s", text):
        piece = piece.strip().rstrip(".")
        if not piece:
            continue
        try:
            parse_statement(piece)
        except LogicParseError:
            continue
        out.append(piece)
    return out


class LogicVerifier:
    """1.0 when the response's statements (plus ``premises``) are jointly satisfiable, else 0.0.

    Sentences that do not parse as statements are ignored; a response with no statements scores
    1.0 (nothing to contradict). ``premises_from_prompt`` adds the prompt's statements too.
    """

    def __init__(self, premises: Iterable[str] = (), premises_from_prompt: bool = False) -> None:
        self.premises = list(premises)
        for p in self.premises:
            parse_statement(p)  # fail at construction, naming the bad premise
        self.premises_from_prompt = premises_from_prompt

    def score(self, prompt: str, response: str) -> float:
        statements = self.premises + extract_statements(response)
        if self.premises_from_prompt:
            statements += extract_statements(prompt)
        if not statements:
            return 1.0
        return 1.0 if consistent(statements)[0] else 0.0
