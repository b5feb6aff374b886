"""Answer extraction, canonicalisation and votes."""

import pytest

from fastpeft.reasoning.answers import (
    answers_match,
    canonicalize,
    extract_answer,
    has_answer_marker,
    is_correct,
    majority_vote,
    weighted_vote,
)


@pytest.mark.parametrize(
    "text",
    ["85", "85.0", " 85 ", "answer: 85", "Answer: 85.", "The answer is 85", "\\boxed{85}", "#### 85", "85.000", "+85"],
)
def test_canonical_forms_of_85_agree(text):
    assert canonicalize(text) == "85"
    assert extract_answer(text) == "85"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 7+8=15 write 5 carry 1; 4+3+1=8; answer 85", "85"),  # the bundled arithmetic task's format
        ("Step 1: 2+3=5\nAnswer: 5\n", "5"),
        ("answer: 3\nwait, answer: 4", "4"),  # the last stated answer wins
        ("#### 1,000", "1000"),
        ("\\boxed{1/2}", "1/2"),
        ("Answer: 0.5 because half", "1/2"),  # exact numbers: 0.5 == 1/2
        ("Answer: -7", "-7"),
        ("Final answer: Paris.", "paris"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["x = 3", "no answer here 5 apples", "", "answer", "we add 3 and 4"])
def test_no_answer_is_none(text):
    assert extract_answer(text) is None
    assert not has_answer_marker(text)


def test_numbers_compare_exactly_not_by_float_rounding():
    assert canonicalize("0.1") != canonicalize("0.10000000000000001")
    assert canonicalize("1,234") == "1234" and canonicalize("1,2") == "1,2"  # only real thousands groups
    assert answers_match("answer: 85", "85.0") and not answers_match(None, "85") and not answers_match("", "")


def test_is_correct_compares_the_stated_answer_with_the_reference():
    assert extract_answer("answer 1; no wait, answer: -12") == "-12"
    assert extract_answer("answer 1,234") == "1234"
    assert is_correct("...; answer 085", 85) and is_correct("#### 0.5", "1/2")
    assert not is_correct("...; answer 86", "85")
    assert not is_correct("garbage", "85") and not is_correct("we add 80 and 5", "85")  # mentioned, not stated


def test_votes_canonicalise_and_break_ties_by_first_seen():
    assert majority_vote(["85", " 85 ", "answer: 85", "84", "84"]) == ("85", 0.6)
    assert majority_vote(["b", "a", "a", "b"])[0] == "b"  # 2-2 tie: first seen
    assert majority_vote([None, None]) == (None, 0.0)
    winner, weight = weighted_vote(["85", "85.0", "84"], [0.2, 0.2, 0.5])
    assert winner == "84" and weight == pytest.approx(0.5)
    assert weighted_vote(["x", "y"], [0.5, 0.5])[0] == "x"


def test_vote_errors():
    with pytest.raises(ValueError, match="differ in length"):
        weighted_vote(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        weighted_vote(["a"], [-1.0])
