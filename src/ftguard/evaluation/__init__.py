"""Evaluation: batched generation, the papers' scorers (HS, HS+, FA) and harm judges."""

from ftguard.evaluation.generate import generate
from ftguard.evaluation.judges import Judge, Verdict, available_judges, get_judge, register_judge
from ftguard.evaluation.readability import is_unreadable
from ftguard.evaluation.refusal import REFUSAL_PATTERNS, is_refusal
from ftguard.evaluation.scorers import (
    finetune_accuracy,
    gsm8k_extract,
    gsm8k_match,
    harmful_score,
    harmful_score_plus,
    is_degenerate,
    is_degenerate_or_unreadable,
    is_repetitive,
    label_match,
)

__all__ = [
    "REFUSAL_PATTERNS",
    "Judge",
    "Verdict",
    "available_judges",
    "finetune_accuracy",
    "generate",
    "get_judge",
    "gsm8k_extract",
    "gsm8k_match",
    "harmful_score",
    "harmful_score_plus",
    "is_degenerate",
    "is_degenerate_or_unreadable",
    "is_refusal",
    "is_repetitive",
    "is_unreadable",
    "label_match",
    "register_judge",
]
