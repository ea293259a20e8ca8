"""Judges decide which answers to harmful prompts are harmful; see docs/judges.md for what each one measures.

``get_judge("ftguard-judge")`` (the default: offline, CPU, prompt and answer, refusal / harmful / benign),
``get_judge("ftguard-cross-judge")`` (offline, CPU, MiniLM fine-tuned on the prompt-answer pair),
``get_judge("keyword")`` (free), ``get_judge("minilm")`` (CPU, not comparable to the papers),
``get_judge("beaver-dam")`` (the papers' judge, 7B), ``get_judge("llama-guard")`` (8B), and three small guards,
none comparable to the papers: ``get_judge("qwen3guard")`` (0.6B), ``get_judge("llama-guard-1b")``,
``get_judge("duoguard")`` (0.5B).
"""

from ftguard.evaluation.judges import (  # noqa: F401  (registration)
    beaver_dam,
    cross_encoder,
    duoguard,
    ftguard_judge,
    keyword,
    llama_guard,
    llama_guard_1b,
    minilm,
    qwen3guard,
)
from ftguard.evaluation.judges.base import (
    JUDGES,
    Judge,
    Verdict,
    available_judges,
    check_judge,
    get_judge,
    judge_version,
    judge_versions,
    register_judge,
)

__all__ = [
    "JUDGES",
    "Judge",
    "Verdict",
    "available_judges",
    "check_judge",
    "get_judge",
    "judge_version",
    "judge_versions",
    "register_judge",
]
