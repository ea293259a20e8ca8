"""Refusal detectors by name: what over-refusal and ``ftguard judge validate`` count as a refusal.

``ftguard`` (default): the rules of ``ftguard.evaluation.refusal`` as features plus a logistic head on MiniLM
embeddings of the answer (``ftguard-judge``'s refusal head), so that refusals without a stock phrase are found.
``rules``: the phrase rules alone; no model, no dependency. Accuracy of both, per held-out source, is in
docs/judges.md.
"""

from __future__ import annotations

from typing import Any, Protocol

from ftguard.evaluation.refusal import REFUSAL_PATTERNS, is_refusal
from ftguard.registry import Registry

DEFAULT_DETECTOR = "ftguard"


class RefusalDetector(Protocol):
    name: str

    def detect(self, prompts: list[str], responses: list[str]) -> list[bool]: ...

    def describe(self) -> dict[str, Any]: ...


class RulesDetector:
    name = "rules"

    def __init__(self) -> None:
        pass

    def detect(self, prompts: list[str], responses: list[str]) -> list[bool]:
        return [is_refusal(r) for r in responses]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "refusal_patterns": len(REFUSAL_PATTERNS)}


class LearnedDetector:
    name = "ftguard"

    def __init__(self, heads_path: str | None = None, batch_size: int = 64, device: str = "cpu") -> None:
        from ftguard.evaluation.judges.ftguard_judge import PairClassifier

        self.classifier = PairClassifier(heads_path, batch_size=batch_size, device=device)

    def detect(self, prompts: list[str], responses: list[str]) -> list[bool]:
        return self.classifier.refusals(list(prompts), list(responses))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.classifier.describe()}


DETECTORS: Registry[type] = Registry("refusal detector")
DETECTORS.register(RulesDetector.name, RulesDetector)
DETECTORS.register(LearnedDetector.name, LearnedDetector)


def get_refusal_detector(name: str = DEFAULT_DETECTOR, **options: Any) -> RefusalDetector:
    DETECTORS.check_options(name, options)
    return DETECTORS[name](**options)
