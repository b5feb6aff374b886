"""Final answers: extraction from free text, canonicalisation, majority and weighted votes.

Two answers are "the same" when their canonical forms are equal: ``"85"``, ``"85.0"``, ``" 85 "``,
``"answer: 85"`` and ``"\\boxed{85}"`` all canonicalise to ``"85"``. Numbers are compared exactly
(``fractions.Fraction``), so ``"0.5"`` and ``"1/2"`` agree and no float rounding can merge two
different answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

# explicit markers a model (or our SFT data) uses to state the final answer; the last one wins
_MARKERS = (
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"####\s*([^\n]+)"),
    re.compile(r"answer\s*(?:is\s*[:=]?|[:=])\s*([^\n]+)", re.IGNORECASE),
    # "answer 85", the bundled arithmetic task's format: a bare "answer" needs a number after it
    re.compile(r"\banswer\s+([-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?)", re.IGNORECASE),
)
_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:/\d+)?")
_LEADING_LABEL = re.compile(r"^(?:####\s*)?(?:(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:=]?\s*)?", re.IGNORECASE)
_WRAPPERS = " \t\n\r.,;:!?\"'`$*()[]{}"


def has_answer_marker(text: str) -> bool:
    """True when ``text`` states a final answer explicitly.

    Markers: ``answer: ..``, ``answer 85``, ``#### ..``, ``\\boxed{..}``.
    """
    return any(m.search(text) for m in _MARKERS)


def _parse_number(text: str) -> Fraction | None:
    s = text.strip()
    if not s or not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def canonicalize(answer: str | None) -> str | None:
    """Canonical form of one answer string; None for None or an empty answer.

    Strips a leading "answer:" label, surrounding whitespace, quotes, brackets and punctuation;
    numbers become exact fractions printed as ``"85"`` or ``"1/2"``; other text is lower-cased with
    internal whitespace collapsed.
    """
    if answer is None:
        return None
    s = _LEADING_LABEL.sub("", answer.strip())
    boxed = _MARKERS[0].search(s)
    if boxed:
        s = boxed.group(1)
    s = s.strip(_WRAPPERS)
    if not s:
        return None
    number = _parse_number(s)
    if number is not None:
        return str(number)  # Fraction prints "85" or "1/2"
    return " ".join(s.lower().split())


def extract_answer(text: str) -> str | None:
    """The canonical final answer stated in a completion, or None.

    Looks for the last explicit marker (``\\boxed{..}``, ``#### ..``, ``answer: ..``); without one,
    a completion that is a bare number (e.g. ``" 85 "``) is its own answer. A number merely
    mentioned inside reasoning text is not an answer.
    """
    best: tuple[int, str] | None = None
    for marker in _MARKERS:
        for m in marker.finditer(text):
            if best is None or m.start() > best[0]:
                best = (m.start(), m.group(1))
    if best is not None:
        value = best[1].strip()
        # "answer: 85. Done" -> the leading number, not the prose after it
        head = value.split()[0].strip(_WRAPPERS) if value.split() else ""
        if _parse_number(head) is not None:
            return canonicalize(head)
        return canonicalize(value)
    stripped = text.strip()
    if _parse_number(stripped.strip(_WRAPPERS)) is not None:
        return canonicalize(stripped)
    return None


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """True when both canonicalise to the same non-empty answer."""
    a, b = canonicalize(predicted), canonicalize(reference)
    return a is not None and a == b


def is_correct(text: str, reference: str | int) -> bool:
    """True when the final answer stated in ``text`` (:func:`extract_answer`) matches ``reference``."""
    return answers_match(extract_answer(text), str(reference))


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> tuple[str | None, float]:
    """The answer with the largest summed weight and that sum; None answers do not vote.

    Ties go to the answer seen first, so the result never depends on dict or set ordering.
    Answers are canonicalised first. Returns ``(None, 0.0)`` when nobody voted.
    """
    if len(answers) != len(weights):
        raise ValueError(f"answers and weights differ in length: {len(answers)} vs {len(weights)}")
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights):
        key = canonicalize(answer)
        if key is None:
            continue
        if weight < 0:
            raise ValueError(f"vote weights must be >= 0, got {weight} for answer {answer!r}")
        totals[key] = totals.get(key, 0.0) + float(weight)
    if not totals:
        return None, 0.0
    # dicts keep insertion order and max() keeps the first maximum: first-seen wins ties
    winner = max(totals, key=lambda k: totals[k])
    return winner, totals[winner]


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """The most frequent canonical answer and its share of the votes cast (ties: first seen)."""
    winner, count = weighted_vote(answers, [1.0] * len(answers))
    cast = sum(canonicalize(a) is not None for a in answers)
    return winner, (count / cast if cast else 0.0)
