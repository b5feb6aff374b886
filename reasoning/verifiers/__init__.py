"""Verifiers: each scores ``(prompt, response)`` in [0, 1] (the :class:`Scorer` protocol).

``VerifierStack`` combines several (product by default) and reports the ones that fail.
"""

from fastpeft.reasoning.verifiers.fact import MEDICAL_FACTSCORE_BAR, FactVerifier, KnowledgeBase
from fastpeft.reasoning.verifiers.learned import CallableScorer, LearnedVerifier
from fastpeft.reasoning.verifiers.logic import LogicVerifier, consistent, dpll
from fastpeft.reasoning.verifiers.safety import SafetyVerifier
from fastpeft.reasoning.verifiers.stack import StackReport, VerifierStack
from fastpeft.reasoning.verifiers.syntax import FormulaVerifier, PythonSyntaxVerifier

__all__ = [
    "MEDICAL_FACTSCORE_BAR",
    "CallableScorer",
    "FactVerifier",
    "FormulaVerifier",
    "KnowledgeBase",
    "LearnedVerifier",
    "LogicVerifier",
    "PythonSyntaxVerifier",
    "SafetyVerifier",
    "StackReport",
    "VerifierStack",
    "consistent",
    "dpll",
]
