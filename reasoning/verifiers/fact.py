"""Fact checking against a local knowledge base, and a FActScore-style metric.

The knowledge base is a file of facts: JSONL (one object per line with ``"fact"`` or ``"text"``, or
``"subject"``/``"relation"``/``"object"``) or TSV (one fact per line; columns are joined with
spaces, so ``aspirin<TAB>treats<TAB>fever`` reads "aspirin treats fever"). A claim is supported
when some fact matches it exactly (after normalisation) or fuzzily: the larger of difflib's
similarity ratio and the share of the claim's content words that the fact contains, at least
``match_threshold``. A claim and a fact that differ in negation ("does not treat") never match.

FActScore (Min et al., arXiv:2305.14251) here is the share of a response's atomic claims
(sentences, split further at semicolons and at ", and" / ", but" clause boundaries) that the
knowledge base supports. The survey "LLM Post-Training: A Deep Dive into Reasoning Large Language
Models" (arXiv:2502.21321) asks > 0.85 of a medical QA system: ``MEDICAL_FACTSCORE_BAR``, the
default ``pass_threshold``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Iterable
from pathlib import Path

MEDICAL_FACTSCORE_BAR = 0.85
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "with",
        "by",
        "and",
        "or",
        "as",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "from",
        "into",
        "than",
        "then",
        "so",
        "also",
        "which",
        "who",
        "whom",
        "has",
        "have",
        "had",
        "do",
        "does",
        "did",
        "can",
        "may",
        "might",
        "will",
        "would",
    ]
)
_NEGATIONS = frozenset({"not", "no", "never", "nor", "cannot", "without", "t"})  # "t" from "doesn t"
_CLAUSE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+|;\s*|,\s*(?:and|but)\s+")


def normalize(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def content_words(text: str) -> set[str]:
    return {w for w in normalize(text).split() if w not in _STOPWORDS}


def split_claims(text: str, min_content_words: int = 2) -> list[str]:
    """Atomic claims of a response: sentences split at ``;`` and ``, and`` / ``, but`` clauses.

    Fragments with fewer than ``min_content_words`` content words ("Yes.") are not claims.
    """
    pieces = (p.strip(" .!?") for p in _CLAUSE_SPLIT.split(text))
    return [p for p in pieces if p and len(content_words(p)) >= min_content_words]


class KnowledgeBase:
    """Facts in memory with an inverted index on content words (so lookups skip unrelated facts)."""

    def __init__(self, facts: Iterable[str]) -> None:
        self.facts: list[str] = []
        self._normalized: dict[str, int] = {}
        self._index: dict[str, list[int]] = {}
        for fact in facts:
            norm = normalize(fact)
            if not norm or norm in self._normalized:
                continue
            i = len(self.facts)
            self.facts.append(fact.strip())
            self._normalized[norm] = i
            for w in content_words(norm):
                self._index.setdefault(w, []).append(i)
        if not self.facts:
            raise ValueError("knowledge base has no facts")

    @classmethod
    def from_file(cls, path: str | Path) -> KnowledgeBase:
        """Load ``.jsonl`` or ``.tsv``; errors name the file and line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"knowledge base file not found: {path}")
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".tsv"):
            raise ValueError(f"knowledge base must be .jsonl or .tsv, got {path.name!r}")
        facts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            facts.append(_jsonl_fact(line, path, lineno) if suffix == ".jsonl" else " ".join(line.split("\t")))
        return cls(facts)

    def __len__(self) -> int:
        return len(self.facts)

    def lookup(self, claim: str) -> tuple[float, str | None]:
        """Best support for ``claim`` in [0, 1] and the fact that gives it (exact match = 1.0)."""
        norm = normalize(claim)
        if norm in self._normalized:
            return 1.0, self.facts[self._normalized[norm]]
        words = content_words(norm)
        shortlist = sorted({i for w in words for i in self._index.get(w, ())})
        best, best_fact = 0.0, None
        for i in shortlist:
            fact_norm = normalize(self.facts[i])
            if _negated(norm) != _negated(fact_norm):
                continue  # "X does not treat Y" is the opposite of "X treats Y", however similar
            overlap = len(words & content_words(fact_norm)) / len(words) if words else 0.0
            ratio = difflib.SequenceMatcher(None, norm, fact_norm).ratio()
            support = max(overlap, ratio)
            if support > best:  # strict: the first fact in file order wins ties
                best, best_fact = support, self.facts[i]
        return best, best_fact


def _negated(normalized: str) -> bool:
    return sum(w in _NEGATIONS for w in normalized.split()) % 2 == 1


def _jsonl_fact(line: str, path: Path, lineno: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    if isinstance(obj, dict):
        for key in ("fact", "text"):
            if isinstance(obj.get(key), str):
                return obj[key]
        if all(isinstance(obj.get(k), str) for k in ("subject", "relation", "object")):
            return f"{obj['subject']} {obj['relation']} {obj['object']}"
    raise ValueError(f"{path}:{lineno}: expected an object with 'fact', 'text' or subject/relation/object")


@dataclasses.dataclass
class FactScoreReport:
    claims: list[str]
    supported: list[bool]
    evidence: list[str | None]
    score: float | None  # None when the response makes no claims
    passed: bool


class FactVerifier:
    """Scores a response by its FActScore against ``kb``; see the module docstring.

    A response with no atomic claims scores ``no_claims_score`` (1.0: nothing to contradict) but
    never passes the FActScore bar (:meth:`passes`), which needs claims.
    """

    def __init__(
        self,
        kb: KnowledgeBase | str | Path,
        match_threshold: float = 0.8,
        pass_threshold: float = MEDICAL_FACTSCORE_BAR,
        no_claims_score: float = 1.0,
    ) -> None:
        for name, v in (
            ("match_threshold", match_threshold),
            ("pass_threshold", pass_threshold),
            ("no_claims_score", no_claims_score),
        ):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        self.kb = kb if isinstance(kb, KnowledgeBase) else KnowledgeBase.from_file(kb)
        self.match_threshold = match_threshold
        self.pass_threshold = pass_threshold
        self.no_claims_score = no_claims_score

    def factscore(self, response: str) -> FactScoreReport:
        claims = split_claims(response)
        looked = [self.kb.lookup(c) for c in claims]
        supported = [s >= self.match_threshold for s, _ in looked]
        score = sum(supported) / len(claims) if claims else None
        passed = score is not None and score > self.pass_threshold
        return FactScoreReport(claims, supported, [f for _, f in looked], score, passed)

    def passes(self, response: str) -> bool:
        """True when the FActScore is above ``pass_threshold`` (the source's bar: > 0.85)."""
        return self.factscore(response).passed

    def score(self, prompt: str, response: str) -> float:
        report = self.factscore(response)
        return self.no_claims_score if report.score is None else report.score
