"""The harder bundled task tier: long sums, multiplication by a digit, multi-step word problems.

Three kinds of problem, all in the bundled task's layout (``"Q: ...\\nA:"``, steps joined by
``"; "``, a final ``answer N``), long enough that one wrong step among many sinks a sample, which
gives step-level search room to help:

- ``sum``: two operands of 4 or 5 digits, column addition as in :mod:`fastpeft.demo.arithmetic`::

      Q: 48213+95678=?            3+8=11 write 1 carry 1; 1+7+1=9; 2+6=8; 8+5=13 write 3 carry 1;
                                  4+9+1=14 write 4 carry 1; write 1; answer 143891
- ``mul``: a 3- or 4-digit number times one digit (2-9), column by column with the carry added::

      Q: 4821*7=?                 1*7=7; 2*7=14 write 4 carry 1; 8*7+1=57 write 7 carry 5;
                                  4*7+5=33 write 3 carry 3; write 3; answer 33747
- ``word``: a three-step word problem with two-digit numbers, one equation per step::

      Q: Ann has 23 pens. She buys 4 packs of 6 and gives away 9. How many pens now?
                                  4*6=24; 23+24=47; 47-9=38; answer 38

Every solution is canonical (one worked order per problem), so :func:`check_steps` is an exact
step checker: a step is right when it equals the reference step at its position and every step
before it was right. It knows the answer (an oracle); the learned verifiers never see it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

KINDS = ("sum", "mul", "word")
STEP_DELIMITER = "; "
_NAMES = (("Ann", "She"), ("Bob", "He"), ("Cal", "He"), ("Dee", "She"), ("Eve", "She"), ("Max", "He"))
_ITEMS = ("pens", "cards", "eggs", "coins", "books", "stamps")
# (question template, steps template); the values are drawn by _word_values
_WORD_TEMPLATES = (
    (
        "{name} has {a} {item}. {pron} buys {b} packs of {c} and gives away {d}. How many {item} now?",
        ("{b}*{c}={bc}", "{a}+{bc}={s}", "{s}-{d}={r}"),
    ),
    (
        "{name} had {a} {item}, lost {d}, then got {b} bags of {c}. How many {item} now?",
        ("{a}-{d}={s}", "{b}*{c}={bc}", "{s}+{bc}={r}"),
    ),
    (
        "{b} boxes hold {c} {item} each. {name} adds {a} and uses {d}. How many {item} are left?",
        ("{b}*{c}={bc}", "{bc}+{a}={s}", "{s}-{d}={r}"),
    ),
)
_SUM = re.compile(r"^Q: (\d+)\+(\d+)=\?\nA:$")
_MUL = re.compile(r"^Q: (\d+)\*(\d)=\?\nA:$")


def _digits_rev(x: int, width: int) -> list[int]:
    return [(x // 10**i) % 10 for i in range(width)]


def sum_steps(a: int, b: int) -> list[str]:
    """Column addition steps, least significant digit first (a final ``write 1`` for a carry out)."""
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for da, db in zip(_digits_rev(a, width), _digits_rev(b, width)):
        s = da + db + carry
        step = f"{da}+{db}" + ("+1" if carry else "") + f"={s}"
        steps.append(step + (f" write {s % 10} carry 1" if s >= 10 else ""))
        carry = s // 10
    return steps + (["write 1"] if carry else [])


def mul_steps(a: int, d: int) -> list[str]:
    """Steps of ``a * d`` (``d`` one digit): ``8*7+1=57 write 7 carry 5`` per column, then ``write c``."""
    if not 0 <= d <= 9:
        raise ValueError(f"mul_steps multiplies by one digit, got {d}")
    steps, carry = [], 0
    for da in _digits_rev(a, len(str(a))):
        p = da * d + carry
        step = f"{da}*{d}" + (f"+{carry}" if carry else "") + f"={p}"
        steps.append(step + (f" write {p % 10} carry {p // 10}" if p >= 10 else ""))
        carry = p // 10
    return steps + ([f"write {carry}"] if carry else [])


def _record(prompt_body: str, steps: Sequence[str], answer: int, kind: str) -> dict[str, str]:
    return {
        "prompt": f"Q: {prompt_body}\nA:",
        "completion": " " + STEP_DELIMITER.join([*steps, f"answer {answer}"]),
        "answer": str(answer),
        "kind": kind,
    }


def make_sum(a: int, b: int) -> dict[str, str]:
    return _record(f"{a}+{b}=?", sum_steps(a, b), a + b, "sum")


def make_mul(a: int, d: int) -> dict[str, str]:
    return _record(f"{a}*{d}=?", mul_steps(a, d), a * d, "mul")


def make_word(template: int, name: int, item: int, a: int, b: int, c: int, d: int) -> dict[str, str]:
    """Word problem ``template`` (index into the three templates) with the given values."""
    question, steps = _WORD_TEMPLATES[template]
    bc = b * c
    s = a - d if template == 1 else a + bc
    r = s + bc if template == 1 else s - d
    if min(s, r) < 0:
        raise ValueError(f"word problem {template} with a={a}, b={b}, c={c}, d={d} goes negative")
    v = {
        "name": _NAMES[name][0],
        "pron": _NAMES[name][1],
        "item": _ITEMS[item],
        "a": a,
        "b": b,
        "c": c,
        "d": d,
        "bc": bc,
        "s": s,
        "r": r,
    }
    return _record(question.format(**v), [t.format(**v) for t in steps], r, "word")


def _draw(rng: random.Random, kind: str) -> dict[str, str]:
    if kind == "sum":
        digits = rng.choice((4, 5))
        lo, hi = 10 ** (digits - 1), 10**digits
        return make_sum(rng.randrange(lo, hi), rng.randrange(lo, hi))
    if kind == "mul":
        digits = rng.choice((3, 4))
        return make_mul(rng.randrange(10 ** (digits - 1), 10**digits), rng.randrange(2, 10))
    template = rng.randrange(len(_WORD_TEMPLATES))
    a, b, c = rng.randrange(10, 60), rng.randrange(2, 10), rng.randrange(2, 10)
    total = a if template == 1 else a + b * c
    d = rng.randrange(2, min(total, 50))
    return make_word(template, rng.randrange(len(_NAMES)), rng.randrange(len(_ITEMS)), a, b, c, d)


def make_hard_dataset(
    n: int, seed: int = 0, kinds: Sequence[str] = KINDS, exclude: set[str] | None = None
) -> list[dict[str, str]]:
    """``n`` distinct problems, kinds drawn uniformly from ``kinds``, deterministic in ``seed``.

    Records are ``{"prompt", "completion", "answer", "kind"}``; ``exclude`` holds prompts to leave
    out (a training set, to draw a disjoint test set).
    """
    bad = [k for k in kinds if k not in KINDS]
    if n < 0 or not kinds or bad:
        raise ValueError(f"need n >= 0 and kinds a non-empty subset of {KINDS}, got n={n}, kinds={tuple(kinds)}")
    rng = random.Random(seed)
    seen, records, tries = set(exclude or ()), [], 0
    while len(records) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems of kinds {tuple(kinds)}")
        record = _draw(rng, rng.choice(list(kinds)))
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            records.append(record)
    return records


def reference_steps(prompt: str) -> list[str]:
    """The canonical worked steps (``answer N`` last) of a hard-tier prompt."""
    if (m := _SUM.match(prompt)) is not None:
        record = make_sum(int(m.group(1)), int(m.group(2)))
    elif (m := _MUL.match(prompt)) is not None:
        record = make_mul(int(m.group(1)), int(m.group(2)))
    else:
        record = _parse_word(prompt)
    return split_response(record["completion"])


def _parse_word(prompt: str) -> dict[str, str]:
    body = prompt.removeprefix("Q: ").removesuffix("\nA:")
    for t, (question, _) in enumerate(_WORD_TEMPLATES):
        pattern = re.escape(question).replace(r"\{name\}", r"(?P<name>\w+)").replace(r"\{pron\}", r"\w+")
        for key in ("a", "b", "c", "d"):
            pattern = pattern.replace(rf"\{{{key}\}}", rf"(?P<{key}>\d+)")
        pattern = pattern.replace(r"\{item\}", r"(?P<item>\w+)", 1).replace(r"\{item\}", r"(?P=item)")
        if (m := re.fullmatch(pattern, body)) is not None:
            name = next(i for i, (n, _) in enumerate(_NAMES) if n == m.group("name"))
            item = _ITEMS.index(m.group("item"))
            return make_word(t, name, item, *(int(m.group(k)) for k in "abcd"))
    raise ValueError(f"not a hard-tier prompt: {prompt!r}")


def split_response(response: str) -> list[str]:
    """The steps of a response (split at ``";"``, stripped, empty pieces dropped)."""
    return [s.strip() for s in response.split(";") if s.strip()]


def check_steps(prompt: str, response: str) -> list[bool]:
    """Per step of ``response``: True while the steps so far equal the reference solution's.

    The first wrong (or extra) step and everything after it are False, so the list is the
    checker-based step label of every prefix.
    """
    reference = reference_steps(prompt)
    labels, ok = [], True
    for i, step in enumerate(split_response(response)):
        ok = ok and i < len(reference) and step == reference[i]
        labels.append(ok)
    return labels
