"""Refusal detectors by name: what over-refusal and ``ftguard judge validate`` count as a refusal.

``ftguard`` (default): the rules of ``ftguard.evaluation.refusal`` as features plus a logistic head on MiniLM
embeddings of the answer (``ftguard-judge``'s refusal head), so that refusals without a stock phrase are found.
``rules``: the phrase rules alone; no model, no dependency. Accuracy of both, per held-out source, is in
docs/judges.md.

Both take ``closed_questions``: a bare "No" to a closed question ("Is Shrek a member of a labour union?") is an
answer, not a refusal (``ftguard.evaluation.refusal.answers_closed_question``). Off by default while the CPU
testbed's study runs, so that its over-refusal is read by one rule throughout (docs/testbed.md); turn it on with
``ftguard judge rescore --detector-option closed_questions=true`` or for a new protocol.
"""

from __future__ import annotations

from typing import Any, Protocol

from ftguard.errors import FtguardError
from ftguard.evaluation.refusal import REFUSAL_PATTERNS, answers_closed_question, is_refusal
from ftguard.registry import Registry

DEFAULT_DETECTOR = "ftguard"


class RefusalDetector(Protocol):
    name: str

    def detect(self, prompts: list[str], responses: list[str]) -> list[bool]: ...

    def describe(self) -> dict[str, Any]: ...


def _answered(
    closed_questions: bool, prompts: list[str], responses: list[str], found: list[bool]
) -> list[bool]:
    if not closed_questions:
        return found
    return [
        f and not answers_closed_question(p, r) for p, r, f in zip(prompts, responses, found, strict=True)
    ]


def _closed_questions_option(value: Any) -> bool:
    if not isinstance(value, bool):
        raise FtguardError(f"refusal detector option closed_questions must be true or false, got {value!r}")
    return value


class RulesDetector:
    name = "rules"

    def __init__(self, closed_questions: bool = False) -> None:
        self.closed_questions = _closed_questions_option(closed_questions)

    def detect(self, prompts: list[str], responses: list[str]) -> list[bool]:
        return _answered(self.closed_questions, prompts, responses, [is_refusal(r) for r in responses])

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "refusal_patterns": len(REFUSAL_PATTERNS)}
        return out | ({"closed_questions": True} if self.closed_questions else {})


class LearnedDetector:
    name = "ftguard"

    def __init__(
        self,
        heads_path: str | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        closed_questions: bool = False,
    ) -> None:
        from ftguard.evaluation.judges.ftguard_judge import PairClassifier

        self.closed_questions = _closed_questions_option(closed_questions)
        self.classifier = PairClassifier(heads_path, batch_size=batch_size, device=device)

    def detect(self, prompts: list[str], responses: list[str]) -> list[bool]:
        found = self.classifier.refusals(list(prompts), list(responses))
        return _answered(self.closed_questions, list(prompts), list(responses), found)

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, **self.classifier.describe()}
        return out | ({"closed_questions": True} if self.closed_questions else {})


DETECTORS: Registry[type] = Registry("refusal detector")
DETECTORS.register(RulesDetector.name, RulesDetector)
DETECTORS.register(LearnedDetector.name, LearnedDetector)


def get_refusal_detector(name: str = DEFAULT_DETECTOR, **options: Any) -> RefusalDetector:
    DETECTORS.check_options(name, options)
    return DETECTORS[name](**options)
