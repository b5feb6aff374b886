"""The bundled verifiable task: multi-digit addition (and subtraction) with worked column steps.

One record looks like::

    {"prompt": "Q: 47+38=?\\nA:",
     "completion": " 7+8=15 write 5 carry 1; 4+3+1=8; answer 85",
     "answer": "85"}

Steps go column by column from the least significant digit, so every step is a one-digit fact a
tiny model can learn; the final ``answer N`` is what
:func:`fastpeft.reasoning.answers.extract_answer` reads back (the library's one answer extractor,
which the rewards, evaluation and search use).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

PROMPT_TEMPLATE = "Q: {a}{op}{b}=?\nA:"
SUPPORTED_OPS = ("+", "-")


def _digits_rev(x: int, width: int) -> list[int]:
    return [(x // 10**i) % 10 for i in range(width)]


def addition_steps(a: int, b: int) -> str:
    """Worked steps for ``a + b`` (non-negative), e.g. ``"7+8=15 write 5 carry 1; 4+3+1=8"``."""
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for da, db in zip(_digits_rev(a, width), _digits_rev(b, width)):
        s = da + db + carry
        step = f"{da}+{db}" + ("+1" if carry else "") + f"={s}"
        if s >= 10:
            step += f" write {s % 10} carry 1"
        steps.append(step)
        carry = s // 10
    if carry:
        steps.append("write 1")
    return "; ".join(steps)


def subtraction_steps(a: int, b: int) -> str:
    """Worked steps for ``a - b`` with ``a >= b >= 0``, e.g. ``"2-8 borrow: 12-8=4; 5-3-1=1"``."""
    if a < b:
        raise ValueError(f"subtraction_steps needs a >= b, got {a} - {b}")
    width = len(str(a))
    steps, borrow = [], 0
    for da, db in zip(_digits_rev(a, width), _digits_rev(b, width)):
        lhs = f"{da}-{db}" + ("-1" if borrow else "")
        d = da - db - borrow
        if d < 0:
            steps.append(f"{lhs} borrow: {d + 10 + db + borrow}-{db + borrow}={d + 10}")
            borrow = 1
        else:
            steps.append(f"{lhs}={d}")
            borrow = 0
    return "; ".join(steps)


def make_problem(a: int, b: int, op: str = "+", restate: bool = False) -> dict[str, str]:
    """One record ``{"prompt", "completion", "answer"}`` for ``a op b``.

    ``restate=True`` starts the completion by repeating the problem in plain form
    (``" 47+38: 7+8=15 ...; answer 85"``), the layout the embedded job's base model is pretrained on.
    """
    if op == "+":
        result, steps = a + b, addition_steps(a, b)
    elif op == "-":
        result, steps = a - b, subtraction_steps(a, b)
    else:
        raise ValueError(f"unsupported operation {op!r}; expected one of {SUPPORTED_OPS}")
    head = f" {a}{op}{b}:" if restate else ""
    return {
        "prompt": PROMPT_TEMPLATE.format(a=a, op=op, b=b),
        "completion": f"{head} {steps}; answer {result}",
        "answer": str(result),
    }


def make_arithmetic_dataset(
    n: int,
    seed: int = 0,
    digits: int = 2,
    ops: Sequence[str] = ("+",),
    exclude: set[str] | None = None,
    restate: bool = False,
) -> list[dict[str, str]]:
    """``n`` distinct problems whose operands have exactly ``digits`` digits (``digits=1``: 0-9),
    deterministic in ``seed``. Equal widths keep every prompt of a dataset in one layout.

    ``exclude`` holds prompts to leave out (e.g. a training set, to make a disjoint test set).
    Subtraction problems are drawn with ``a >= b`` so answers stay non-negative. ``restate``: see
    :func:`make_problem`.
    """
    if n < 0 or digits < 1:
        raise ValueError(f"need n >= 0 and digits >= 1, got n={n}, digits={digits}")
    bad = [op for op in ops if op not in SUPPORTED_OPS]
    if not ops or bad:
        raise ValueError(f"ops must be a non-empty subset of {SUPPORTED_OPS}, got {tuple(ops)}")
    exclude = set(exclude or ())
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits
    m = high - low
    space = sum(m * m if op == "+" else m * (m + 1) // 2 for op in set(ops))  # a - b needs a >= b
    if n > space - len(exclude):
        raise ValueError(f"cannot draw {n} distinct {digits}-digit problems (only {space} exist)")
    rng = random.Random(seed)
    seen, records = set(exclude), []
    while len(records) < n:
        op = rng.choice(list(ops))
        a, b = rng.randrange(low, high), rng.randrange(low, high)
        if op == "-" and a < b:
            a, b = b, a
        record = make_problem(a, b, op, restate)
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            records.append(record)
    return records
