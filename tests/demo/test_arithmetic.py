"""The bundled arithmetic task: worked steps, answers, disjoint datasets."""

from __future__ import annotations

import pytest

from fastpeft.demo.arithmetic import addition_steps, make_arithmetic_dataset, make_problem, subtraction_steps
from fastpeft.reasoning.answers import extract_answer, is_correct


def test_documented_example():
    rec = make_problem(47, 38)
    assert rec == {
        "prompt": "Q: 47+38=?\nA:",
        "completion": " 7+8=15 write 5 carry 1; 4+3+1=8; answer 85",
        "answer": "85",
    }


@pytest.mark.parametrize(
    "a,b,steps",
    [(95, 7, "5+7=12 write 2 carry 1; 9+0+1=10 write 0 carry 1; write 1"), (3, 4, "3+4=7"), (0, 0, "0+0=0")],
)
def test_addition_steps_by_hand(a, b, steps):
    assert addition_steps(a, b) == steps


def test_subtraction_steps_by_hand():
    assert subtraction_steps(52, 38) == "2-8 borrow: 12-8=4; 5-3-1=1"
    assert subtraction_steps(100, 1) == "0-1 borrow: 10-1=9; 0-0-1 borrow: 10-1=9; 1-0-1=0"
    with pytest.raises(ValueError, match="a >= b"):
        subtraction_steps(3, 5)


def test_dataset_is_deterministic_distinct_and_correct():
    data = make_arithmetic_dataset(300, seed=7, digits=3, ops=("+", "-"))
    assert data == make_arithmetic_dataset(300, seed=7, digits=3, ops=("+", "-"))
    assert data != make_arithmetic_dataset(300, seed=8, digits=3, ops=("+", "-"))
    assert len({r["prompt"] for r in data}) == 300
    for r in data:
        expr = r["prompt"][3:-5]  # "Q: " ... "=?\nA:"
        op = "+" if "+" in expr else "-"
        a, b = map(int, expr.split(op))
        assert int(r["answer"]) == (a + b if op == "+" else a - b)
        assert is_correct(r["completion"], r["answer"])
    ops = {"+" if "+" in r["prompt"] else "-" for r in data}
    assert ops == {"+", "-"}


def test_exclude_makes_disjoint_sets():
    test = make_arithmetic_dataset(50, seed=1, digits=1)
    train = make_arithmetic_dataset(50, seed=2, digits=1, exclude={r["prompt"] for r in test})
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    with pytest.raises(ValueError, match="only 100 exist"):
        make_arithmetic_dataset(101, digits=1)
    assert len(make_arithmetic_dataset(155, digits=1, ops=("+", "-"))) == 155  # 100 sums + 55 differences
    with pytest.raises(ValueError, match="only 155 exist"):
        make_arithmetic_dataset(156, digits=1, ops=("+", "-"))
    assert all(len(r["prompt"]) == len("Q: 10+10=?\nA:") for r in make_arithmetic_dataset(30, digits=2))


def test_the_library_extractor_reads_the_task_format():
    assert extract_answer(make_problem(995, 7)["completion"]) == "1002"  # carries into a new digit
    assert extract_answer(make_problem(52, 38, "-")["completion"]) == "14"
    assert extract_answer(make_problem(47, 38, restate=True)["completion"]) == "85"  # " 47+38: ...; answer 85"


def test_bad_arguments():
    with pytest.raises(ValueError, match="ops"):
        make_arithmetic_dataset(3, ops=("*",))
    with pytest.raises(ValueError, match="digits"):
        make_arithmetic_dataset(3, digits=0)
