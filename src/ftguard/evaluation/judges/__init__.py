"""Judges decide which answers to harmful prompts are harmful; see docs/judges.md for what each one measures.

``get_judge("keyword")`` (free), ``get_judge("minilm")`` (CPU, not comparable to the papers),
``get_judge("beaver-dam")`` (the papers' judge, 7B), ``get_judge("llama-guard")`` (8B).
"""

from ftguard.evaluation.judges import beaver_dam, keyword, llama_guard, minilm  # noqa: F401  (registration)
from ftguard.evaluation.judges.base import (
    JUDGES,
    Judge,
    Verdict,
    available_judges,
    get_judge,
    register_judge,
)

__all__ = ["JUDGES", "Judge", "Verdict", "available_judges", "get_judge", "register_judge"]
