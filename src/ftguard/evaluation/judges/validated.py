"""How well each judge agreed with people's labels, for reports to print beside the judge's name.

``ftguard/assets/judge_validation.json`` is written by ``scripts/make_judges_md.py`` from
``ftguard judge validate`` on the labelled sources of docs/judges.md (held out source by source for
``ftguard-judge``). A judge without an entry (the model judges: no weights here) says so instead of a number.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

OFFLINE_JUDGES = ("ftguard-judge", "minilm", "keyword")


@cache
def _summary() -> dict[str, Any]:
    path = resources.files("ftguard") / "assets" / "judge_validation.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def validation_summary(judge: str) -> dict[str, Any] | None:
    """{"harm": {...}, "refusal": {...}} pooled over the labelled sources, or None when never validated here."""
    return _summary().get(judge)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def validation_line(judge: str) -> str:
    """One sentence for a report: the judge's validated accuracy, or that it has none here."""
    summary = validation_summary(judge)
    harm = (summary or {}).get("harm")
    if not harm:
        if judge in OFFLINE_JUDGES:
            return f"Judge `{judge}`: no validation summary in this installation (scripts/make_judges_md.py writes it)."
        return (
            f"Judge `{judge}`: not validated against labelled answers here (its weights are not available "
            "offline); `ftguard judge validate` measures it where they are."
        )
    spread = harm.get("accuracy_by_source")
    per_source = f", {_pct(spread[0])}–{_pct(spread[1])} by source" if spread else ""
    held = " held out source by source" if judge == "ftguard-judge" else ""
    return (
        f"Judge `{judge}`: accuracy {_pct(harm['accuracy'])}{per_source}, recall {_pct(harm['recall'])}, "
        f"false-positive rate {_pct(harm['fpr'])} on {harm['n']:,} labelled answers{held} "
        "(docs/judges.md)."
    )
