"""Fact verifier (exact / fuzzy lookup, FActScore) and the safety filter."""

import json

import pytest

from fastpeft.reasoning.verifiers.fact import (
    MEDICAL_FACTSCORE_BAR,
    FactVerifier,
    KnowledgeBase,
    split_claims,
)
from fastpeft.reasoning.verifiers.safety import SafetyVerifier

FACTS = [
    ("aspirin", "treats", "fever"),
    ("insulin", "regulates", "blood sugar"),
    ("the heart", "has", "four chambers"),
    ("penicillin", "is", "an antibiotic"),
]


@pytest.fixture
def kb_tsv(tmp_path):
    path = tmp_path / "kb.tsv"
    path.write_text("\n".join("\t".join(f) for f in FACTS) + "\n")
    return path


def test_kb_loads_jsonl_and_tsv_alike(tmp_path, kb_tsv):
    jsonl = tmp_path / "kb.jsonl"
    rows = [{"subject": s, "relation": r, "object": o} for s, r, o in FACTS[:2]]
    rows += [{"fact": " ".join(FACTS[2])}, {"text": " ".join(FACTS[3])}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert KnowledgeBase.from_file(jsonl).facts == KnowledgeBase.from_file(kb_tsv).facts
    assert len(KnowledgeBase.from_file(kb_tsv)) == 4


def test_kb_file_errors(tmp_path):
    bad = tmp_path / "kb.jsonl"
    bad.write_text('{"fact": "a b"}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"kb.jsonl:2"):
        KnowledgeBase.from_file(bad)
    csv = tmp_path / "kb.csv"
    csv.write_text("aspirin,treats,fever\n")
    with pytest.raises(ValueError, match=r"must be .jsonl or .tsv"):
        KnowledgeBase.from_file(csv)
    with pytest.raises(FileNotFoundError):
        KnowledgeBase.from_file(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="no facts"):
        KnowledgeBase([" ", "!!"])


def test_exact_and_fuzzy_lookup(kb_tsv):
    kb = KnowledgeBase.from_file(kb_tsv)
    assert kb.lookup("Aspirin treats fever.") == (1.0, "aspirin treats fever")  # exact after normalising
    score, fact = kb.lookup("The human heart has four chambers")
    assert 0.8 <= score < 1.0 and fact == "the heart has four chambers"  # fuzzy
    assert kb.lookup("aspirin treats fevers")[0] > 0.9
    assert kb.lookup("Aspirin cures cancer")[0] < 0.8
    assert kb.lookup("Aspirin does not treat fever") == (0.0, None)  # negation never matches
    assert kb.lookup("Quantum chromodynamics") == (0.0, None)


def test_claim_splitting():
    text = "Yes. Aspirin treats fever, and insulin regulates blood sugar; the heart has four chambers!"
    expected = ["Aspirin treats fever", "insulin regulates blood sugar", "the heart has four chambers"]
    assert split_claims(text) == expected


def test_factscore_and_the_medical_bar(kb_tsv):
    v = FactVerifier(kb_tsv)
    assert v.pass_threshold == MEDICAL_FACTSCORE_BAR == 0.85
    mixed = (
        "Aspirin treats fever. Insulin regulates blood sugar; the heart has four chambers, and aspirin cures cancer."
    )
    report = v.factscore(mixed)
    assert report.supported == [True, True, True, False]
    assert report.score == 0.75 and not report.passed and v.score("", mixed) == 0.75
    good = "Aspirin treats fever. Penicillin is an antibiotic."
    assert v.factscore(good).score == 1.0 and v.passes(good)
    assert FactVerifier(kb_tsv, pass_threshold=0.7).passes(mixed)  # the threshold is exposed
    assert v.factscore("Yes.").score is None and v.score("", "Yes.") == 1.0 and not v.passes("Yes.")
    with pytest.raises(ValueError, match="pass_threshold"):
        FactVerifier(kb_tsv, pass_threshold=1.5)


def test_safety_blocklist_and_classifier():
    v = SafetyVerifier(blocklist=["make a bomb", "rm -rf /"])
    assert v.score("", "Here is how to MAKE   a bomb") == 0.0
    assert v.score("", "run rm -rf / now") == 0.0
    assert v.score("", "makeshift bombastic prose") == 1.0  # whole words only
    assert v.blocked_phrases("make a bomb, then rm -rf /") == ["make a bomb", "rm -rf /"]
    hook = SafetyVerifier(blocklist=[], classifier=lambda text: 0.25 if "risky" in text else 0.0)
    assert hook.score("", "a risky plan") == 0.75 and hook.score("", "tea") == 1.0
    broken = SafetyVerifier(classifier=lambda text: 3.0)
    with pytest.raises(ValueError, match="probability"):
        broken.score("", "x")
    with pytest.raises(TypeError, match="callable"):
        SafetyVerifier(classifier="not callable")
