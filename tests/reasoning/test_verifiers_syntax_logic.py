"""Syntax (Python, formulas) and propositional-logic verifiers."""

import pytest

from fastpeft.reasoning.verifiers.logic import (
    LogicParseError,
    LogicVerifier,
    consistent,
    dpll,
    parse_statement,
    to_clauses,
)
from fastpeft.reasoning.verifiers.syntax import (
    FormulaError,
    FormulaVerifier,
    PythonSyntaxVerifier,
    check_python,
    equation_holds,
    find_equations,
    parse_formula,
)


def test_python_syntax_good_and_bad_code():
    v = PythonSyntaxVerifier()
    assert v.score("", "def f(x):\n    return x + 1\n") == 1.0
    assert v.score("", "def f(x:\n    return x\n") == 0.0
    assert check_python("for i in range(3) print(i)").startswith("line 1:")
    fenced = "Here:\n```python\nx = 1\n```\nand\n```python\nif x\n```\n"
    assert v.score("", fenced) == 0.5  # one of two blocks parses


def test_python_is_parsed_never_run(tmp_path):
    marker = tmp_path / "ran"
    assert PythonSyntaxVerifier().score("", f"open({str(marker)!r}, 'w').write('x')") == 1.0
    assert not marker.exists()


@pytest.mark.parametrize(
    ("formula", "holds"),
    [
        ("3 + 4 = 7", True),
        ("3+4=8", False),
        ("0.1 + 0.2 = 0.3", True),
        ("2^10 = 1024", True),
        ("sqrt(16) = 4", True),
        ("(2+3)*4 = 20 = 4*5", True),
        ("7 // 2 = 3", True),
        ("2*x + 1 = 7", None),
        ("12 × 3 = 36", True),
        ("-5 + 2 = -3", True),
    ],
)
def test_equation_values(formula, holds):
    assert equation_holds(formula) is holds


@pytest.mark.parametrize(
    "bad",
    [
        "3 +* 4",
        "__import__('os').system('true')",
        "(1 + 2",
        "x.y = 1",
        "[1, 2]",
        "lambda: 1",
        "1 = ",
        "",
        "1/0 = 1",
        "9**9**9**9 = 1",
        "'a' = 'a'",
    ],
)
def test_malformed_or_forbidden_formulas_are_errors(bad):
    with pytest.raises(FormulaError):
        equation_holds(bad)


def test_formula_parse_returns_one_tree_per_side():
    assert len(parse_formula("1 + 2 = 3 = 6 / 2")) == 3
    assert len(parse_formula("a * (b + c)")) == 1


def test_find_equations_trims_prose_and_labels():
    text = "Step 1: 3 + 4 = 7\nso the total is 7 * 2 = 14 apples.\n 7+8=15 write 5 carry 1; 4+3+1=8; answer 85"
    assert find_equations(text) == ["3 + 4 = 7", "7 * 2 = 14", "7+8 = 15", "4+3+1 = 8"]


def test_formula_verifier_scores():
    v = FormulaVerifier()
    assert v.score("", " 3+5=8; 8+9=17; answer 17") == 1.0
    assert v.score("", " 3+5=8; 8+9=18; 18+1=19; 19+1=21") == 0.5
    assert FormulaVerifier(aggregate="all").score("", " 3+5=8; 8+9=18") == 0.0
    assert FormulaVerifier(check_values=False).score("", " 3+5=9") == 1.0  # syntax only
    assert v.score("", "no equations here") == 1.0  # nothing to contradict
    with pytest.raises(ValueError, match="aggregate"):
        FormulaVerifier(aggregate="median")


def test_statement_parser_precedence_and_atoms():
    assert parse_statement("A and not B -> C") == ("imp", ("and", ("var", "a"), ("not", ("var", "b"))), ("var", "c"))
    assert parse_statement("a -> b -> c") == ("imp", ("var", "a"), ("imp", ("var", "b"), ("var", "c")))
    assert parse_statement("it rains => the ground is wet")[2] == ("var", "the ground is wet")
    assert parse_statement("p | q & r") == ("or", ("var", "p"), ("and", ("var", "q"), ("var", "r")))
    for bad in ["A and", "(A or B", "A B )", "->", ""]:
        with pytest.raises(LogicParseError):
            parse_statement(bad)


def test_dpll_on_satisfiable_and_unsatisfiable_clause_sets():
    sat = [[1, 2], [-1, 3], [-3, -2], [2, 3]]
    model = dpll(sat)
    assert model is not None
    assert all(any(model.get(abs(x), False) == (x > 0) for x in c) for c in sat)  # really satisfies
    assert dpll([[1, 2], [-1, 2], [1, -2], [-1, -2]]) is None  # all four sign patterns
    pigeonhole = [[1, 2], [3, 4], [5, 6], [-1, -3], [-1, -5], [-3, -5], [-2, -4], [-2, -6], [-4, -6]]
    assert dpll(pigeonhole) is None  # 3 pigeons, 2 holes
    assert dpll([]) == {} and dpll([[]]) is None
    with pytest.raises(ValueError, match="non-zero ints"):
        dpll([[1, 0]])


def test_tseitin_clauses_preserve_satisfiability():
    clauses, atoms = to_clauses([parse_statement("(a or b) and not a")])
    model = dpll(clauses)
    assert model is not None and model[atoms["b"]] is True and model[atoms["a"]] is False


def test_consistency_of_statements():
    assert consistent(["A -> B", "A", "not B"]) == (False, None)
    ok, witness = consistent(["A -> B", "A"])
    assert ok and witness == {"a": True, "b": True}
    assert not consistent(["p <-> not p"])[0]
    assert consistent(["rain -> wet", "not wet", "not rain"])[0]


def test_logic_verifier_with_premises():
    v = LogicVerifier(premises=["p -> q"])
    assert v.score("", "p. not q.") == 0.0
    assert v.score("", "p. q.") == 1.0
    assert LogicVerifier().score("", "") == 1.0
    assert LogicVerifier(premises_from_prompt=True).score("p\nnot q", "p -> q") == 0.0
    with pytest.raises(LogicParseError):
        LogicVerifier(premises=["p ->"])
