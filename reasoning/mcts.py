"""Monte-Carlo tree search over reasoning steps.

One iteration: *select* a leaf from the root by UCT among children that still have something to
explore; *expand* it with ``expand`` sampled steps (one batched generate call); *evaluate* each new
child, either with the scorer on the partial response (``rollout="value"``, a process-reward value
estimate) or by generating the rest of the response and scoring it (``rollout="full"``); then
*backpropagate* each child's reward: every node on its path gains one visit and the reward.

A child that ended at EOS or stated an answer is terminal and scored as a whole response; a child at
``max_depth`` is completed by one rollout and becomes terminal. Terminal nodes are not selected
again, and a node whose children are all exhausted is exhausted itself; the search stops when the
root is exhausted, after ``max_iterations``, or when the budget cannot pay for another expansion.
The answer is chosen among the complete responses found (highest reward, or a vote).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from fastpeft.reasoning.answers import extract_answer
from fastpeft.reasoning.beam import step_params
from fastpeft.reasoning.budget import BudgetedGenerator
from fastpeft.reasoning.strategy_base import (
    Aggregate,
    Candidate,
    ScoreKeeper,
    SearchResult,
    check_aggregate,
    check_prompt,
    ends_response,
    make_result,
    require_scorer,
    select,
)
from fastpeft.reasoning.types import SamplingParams, Scorer


@dataclasses.dataclass(eq=False)
class Node:
    """A partial response. ``value_sum / visits`` is the mean reward of the rollouts below it."""

    text: str
    parent: Node | None = None
    depth: int = 0
    children: list[Node] = dataclasses.field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0
    terminal: bool = False
    exhausted: bool = False

    @property
    def mean_value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def add_child(self, text: str) -> Node:
        child = Node(text, parent=self, depth=self.depth + 1)
        self.children.append(child)
        return child


def uct(value_sum: float, visits: int, parent_visits: int, c: float) -> float:
    """UCT = value_sum / visits + c * sqrt(ln(parent_visits) / visits); unvisited children score +inf."""
    if visits == 0:
        return math.inf
    return value_sum / visits + c * math.sqrt(math.log(max(parent_visits, 1)) / visits)


def select_child(node: Node, c: float) -> Node | None:
    """The open child with the highest UCT (ties: the earliest child), or None if all are exhausted."""
    best: Node | None = None
    best_score = -math.inf
    for child in node.children:
        if child.exhausted:
            continue
        s = uct(child.value_sum, child.visits, node.visits, c)
        if s > best_score:
            best, best_score = child, s
    return best


def backpropagate(node: Node, reward: float) -> None:
    """Add one visit and ``reward`` to ``node`` and every ancestor up to the root."""
    walk: Node | None = node
    while walk is not None:
        walk.visits += 1
        walk.value_sum += reward
        walk = walk.parent


def select_leaf(root: Node, c: float) -> Node | None:
    """Descend by UCT to an unexpanded, open leaf; marks dead ends exhausted. None: tree exhausted."""
    while not root.exhausted:
        node = root
        while node.children:
            child = select_child(node, c)
            if child is None:
                node.exhausted = True
                break
            node = child
        else:
            return node
    return None


def mcts(
    generator: BudgetedGenerator,
    prompt: str,
    scorer: Scorer | None = None,
    params: SamplingParams | None = None,
    expand: int = 3,
    max_depth: int = 5,
    c_uct: float = 1.4,
    rollout: Literal["value", "full"] = "full",
    max_iterations: int = 64,
    rollout_max_new_tokens: int | None = None,
    stop: str | tuple[str, ...] = "\n",
    aggregate: Aggregate = "best",
) -> SearchResult:
    """MCTS; ``params.max_new_tokens`` is per step, ``rollout_max_new_tokens`` per rollout
    (default: ``max_depth`` steps' worth)."""
    prompt = check_prompt(prompt)
    keeper = ScoreKeeper(require_scorer(scorer, "mcts"), generator.budget)
    check_aggregate(aggregate)
    if expand < 1 or max_depth < 1 or max_iterations < 1:
        raise ValueError(f"expand, max_depth, max_iterations must be >= 1, got {expand}, {max_depth}, {max_iterations}")
    if rollout not in ("value", "full"):
        raise ValueError(f"rollout must be 'value' or 'full', got {rollout!r}")
    if c_uct < 0:
        raise ValueError(f"c_uct must be >= 0, got {c_uct}")
    step = step_params(params, stop)
    roll = dataclasses.replace(step, stop=(), max_new_tokens=rollout_max_new_tokens or step.max_new_tokens * max_depth)
    budget = generator.budget
    root = Node("")
    found: list[Candidate] = []
    iterations = 0
    while iterations < max_iterations and not budget.exhausted:
        leaf = select_leaf(root, c_uct)
        if leaf is None:
            break
        if not budget.can_generate(expand) or (
            budget.rows_affordable(step.max_new_tokens) < expand and (found or iterations)
        ):
            break
        outs = generator.generate([prompt + leaf.text], step, n=expand)[0]
        iterations += 1
        children, to_roll = [], []
        for comp in outs:
            child = leaf.add_child(leaf.text + comp.text)
            children.append(child)
            if ends_response(comp):
                child.terminal = child.exhausted = True
            elif child.depth >= max_depth or rollout == "full":
                to_roll.append(child)
        rolled: dict[int, str] = {}
        if to_roll and budget.can_generate(len(to_roll)):
            finals = generator.generate([prompt + ch.text for ch in to_roll], roll, n=1)
            rolled = {id(ch): ch.text + f[0].text for ch, f in zip(to_roll, finals, strict=True)}
        for child in children:
            if child.depth >= max_depth:
                child.exhausted = True  # the depth limit: this path ends with its rollout
            full = rolled.get(id(child))
            if child.terminal or full is not None:
                text = child.text if child.terminal else full
                reward = keeper(prompt, text)
                found.append(Candidate(text, extract_answer(text), reward, True))
            else:
                reward = keeper(prompt, child.text)  # value estimate of the partial response
            backpropagate(child, reward)
    chosen, vote = select(found, aggregate) if found else (None, {})
    cands = found
    if chosen is None:  # nothing finished: report the most visited path, unfinished
        node = root
        while node.children:
            node = max(node.children, key=lambda ch: (ch.visits, ch.mean_value))
        if node is not root:
            chosen = Candidate(node.text, extract_answer(node.text), node.mean_value, False)
            cands = [chosen]
    details = {"iterations": iterations, "root_visits": root.visits, "tree_exhausted": root.exhausted, **vote}
    return make_result("mcts", prompt, chosen, cands, budget, keeper, details)
