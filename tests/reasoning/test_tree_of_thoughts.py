"""Tree-of-Thoughts BFS: top-k pruning, threshold, backtracking, on a scripted thought tree."""

import pytest

from fastpeft.reasoning.search import search
from fastpeft.reasoning.types import Completion
from fastpeft.reasoning.verifiers import CallableScorer

PROMPT = "Puzzle:"
# prefix -> the thoughts a model proposes next (row j of a call gets thought j, cycling)
TREE = {
    "": ["A; ", "B; "],
    "A; ": ["A1; ", "A2; "],
    "B; ": ["B1; ", "answer 7"],
    "B; B1; ": ["answer 8", "answer 9"],
}
VALUES = {
    "A; ": 0.9,
    "B; ": 0.8,
    "A; A1; ": 0.1,
    "A; A2; ": 0.2,
    "B; B1; ": 0.6,
    "B; answer 7": 0.95,
    "B; B1; answer 8": 0.7,
    "B; B1; answer 9": 0.3,
}


class ScriptedThoughts:
    def __init__(self):
        self.expanded = []

    def generate(self, prompts, params, n=1, adapters=None):
        out = []
        for prompt in prompts:
            prefix = prompt[len(PROMPT) :]
            self.expanded.append(prefix)
            thoughts = TREE[prefix]
            row = []
            for j in range(n):
                text = thoughts[j % len(thoughts)]
                finish = "eos" if text.startswith("answer") else "stop"
                row.append(Completion(text, [0] * len(text.split()), [-0.1] * len(text.split()), finish))
            out.append(row)
        return out


value = CallableScorer(lambda prompt, response: VALUES[response])


def test_backtracks_when_every_child_is_below_threshold():
    gen = ScriptedThoughts()
    result = search(
        gen, PROMPT, "tree_of_thoughts", budget=1000, scorer=value, n_thoughts=2, keep=1, threshold=0.5, stop="; "
    )
    # A (0.9) beats B (0.8) and is kept alone; both of A's children fall below 0.5, so the search
    # returns to the remembered B: its child "answer 7" finishes (0.95), B1 (0.6) is extended further
    assert gen.expanded == ["", "A; ", "B; ", "B; B1; "]
    assert result.details["backtracks"] == 1
    assert result.answer == "7" and result.score == 0.95  # the best finished state wins
    # finished at or above the threshold: "answer 7" and "answer 8"; "answer 9" (0.3) is not
    assert result.details["accumulated_rewards"] == [pytest.approx(0.8 + 0.95), pytest.approx(0.8 + 0.6 + 0.7)]


def test_keeps_top_k_breadth_first():
    gen = ScriptedThoughts()
    result = search(
        gen, PROMPT, "tree_of_thoughts", budget=1000, scorer=value, n_thoughts=2, keep=2, threshold=0.5, stop="; "
    )
    # both A and B survive level 1; level 2 expands them together (one batched call)
    assert gen.expanded[:3] == ["", "A; ", "B; "] and result.details["levels"] >= 2
    assert result.answer == "7"


def test_nothing_above_threshold_reports_the_best_below():
    gen = ScriptedThoughts()
    result = search(
        gen, PROMPT, "tree_of_thoughts", budget=1000, scorer=value, n_thoughts=2, keep=1, threshold=0.99, stop="; "
    )
    assert result.answer is None and result.candidates[0].complete is False  # nothing ever finished
    assert result.details["finished"] == 0


def test_threshold_is_checked():
    with pytest.raises(ValueError, match="threshold"):
        search(ScriptedThoughts(), PROMPT, "tree_of_thoughts", scorer=value, threshold=1.5)
