"""The bundled multi-part task for the swarm: sums of four 4-digit numbers.

A single agent adds all four column by column (carries up to 3)::

    Q: 3471+5829+9162+2038=?     1+9+2+8=20 write 0 carry 2; 7+2+6+3+2=20 write 0 carry 2;
                                 4+8+1+0+2=15 write 5 carry 1; 3+5+9+2+1=20 write 0 carry 2; write 2; answer 20500

The swarm splits the work between three roles, each an adapter on the same base:

- decomposer: ``Q: 3471+5829+9162+2038=?`` -> ``3471+5829; 9162+2038`` (two parts);
- solver: each part is a hard-tier ``sum`` question (``Q: 3471+5829=?``), solved by the policy;
- integrator: ``Q: 3471+5829+9162+2038=?\\nparts: 9300, 11200\\nA:`` -> the column sum of the two
  part answers (``0+0=0; 0+0=0; 3+2=5; 9+1=10 write 0 carry 1; 0+1+1=2; answer 20500``).

:func:`parse_parts` and :func:`integration_prompt` are the task functions
:func:`fastpeft.reasoning.swarm.swarm` takes; the ``*_records`` functions make each role's SFT data.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from fastpeft.demo.hard_tier import STEP_DELIMITER, make_sum, sum_steps

OPERANDS = 4
_QUESTION = re.compile(r"^Q: ([\d+]+)=\?")
_PAIR = re.compile(r"(\d+)\+(\d+)")


def multi_sum_steps(numbers: Sequence[int]) -> list[str]:
    """Column addition of several numbers: ``1+9+2+8=20 write 0 carry 2`` per column, then ``write c``."""
    width = max(len(str(x)) for x in numbers)
    steps, carry = [], 0
    for col in range(width):
        digits = [(x // 10**col) % 10 for x in numbers]
        s = sum(digits) + carry
        step = "+".join(map(str, digits)) + (f"+{carry}" if carry else "") + f"={s}"
        steps.append(step + (f" write {s % 10} carry {s // 10}" if s >= 10 else ""))
        carry = s // 10
    return steps + ([f"write {carry}"] if carry else [])


def make_multipart(numbers: Sequence[int]) -> dict[str, str]:
    total = sum(numbers)
    steps = STEP_DELIMITER.join([*multi_sum_steps(numbers), f"answer {total}"])
    return {"prompt": "Q: " + "+".join(map(str, numbers)) + "=?\nA:", "completion": " " + steps, "answer": str(total)}


def make_multipart_dataset(n: int, seed: int = 0, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """``n`` distinct sums of four 4-digit numbers, deterministic in ``seed``."""
    rng = random.Random(seed)
    seen, out = set(exclude or ()), []
    while len(out) < n:
        rec = make_multipart([rng.randrange(1000, 10000) for _ in range(OPERANDS)])
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            out.append(rec)
    return out


def operands(question: str) -> list[int]:
    m = _QUESTION.match(question)
    if m is None:
        raise ValueError(f"not a multi-part sum question: {question!r}")
    return [int(x) for x in m.group(1).split("+")]


def decomposition(question: str) -> str:
    """The decomposer's target: the operands in pairs, ``" 3471+5829; 9162+2038"``."""
    xs = operands(question)
    return " " + STEP_DELIMITER.join(f"{a}+{b}" for a, b in zip(xs[::2], xs[1::2]))


def parse_parts(question: str, text: str) -> list[str]:
    """Part questions from a decomposition: every ``a+b`` it writes becomes ``Q: a+b=?\\nA:``."""
    return [make_sum(int(a), int(b))["prompt"] for a, b in _PAIR.findall(text)]


def integration_prompt(question: str, parts: Sequence[str], answers: Sequence[str]) -> str:
    return question.removesuffix("\nA:") + "\nparts: " + ", ".join(answers) + "\nA:"


def integration_completion(answers: Sequence[str]) -> str:
    xs = [int(a) for a in answers]
    return " " + STEP_DELIMITER.join([*sum_steps(*xs), f"answer {sum(xs)}"]) if len(xs) == 2 else ""


def decomposer_records(records: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    return [{"prompt": r["prompt"], "completion": decomposition(r["prompt"])} for r in records]


def integrator_records(records: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Integration questions with the true part answers, and their column sums."""
    out = []
    for r in records:
        xs = operands(r["prompt"])
        answers = [str(a + b) for a, b in zip(xs[::2], xs[1::2])]
        out.append(
            {
                "prompt": integration_prompt(r["prompt"], [], answers),
                "completion": integration_completion(answers),
                "answer": r["answer"],
            }
        )
    return out
