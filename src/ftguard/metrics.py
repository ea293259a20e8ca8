"""The metrics of results.json: one entry per rate an evaluation point writes, and how reports print them.

results.md, `ftguard compare`, `ftguard gate`, the sweep report and scripts/make_results_md.py take each metric's
name, label and direction from here, so that a metric the evaluation adds reaches every reader from one place.
Imports nothing heavy: the gate runs in a release pipeline that need not have torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str  # as written in results.json (and in its "intervals" and "counts")
    label: str  # table columns and headings
    abbrev: str  # where space is short: the results pages' verdict lines and narrow tables
    title: str  # in words: help texts and plot axes
    # None: a diagnostic read beside the others (a low HS with many degenerate answers is collapse, not safety,
    # docs/judges.md), never a goal of its own, so reports print no arrow and the gate has no threshold for it.
    higher_is_better: bool | None
    unit: str = "%"
    counted: bool = True  # results.json holds its (k, n) counts and 95% Wilson interval
    gate: str | None = None  # the gate's threshold is max_<gate> (lower is better) or min_<gate>
    # In the sweep's tables, verdicts and the gate. False for a metric only some protocols measure, so that the
    # tables of runs without it stay as they were.
    headline: bool = True
    # False for a metric only some runs measure (the triggered HS of an attack that teaches a trigger): every
    # evaluation point writes the others.
    always: bool = True

    @property
    def arrow(self) -> str:
        return "" if self.higher_is_better is None else "↑" if self.higher_is_better else "↓"

    @property
    def column(self) -> str:
        """The label with its direction, as results.md and compare head their columns: ``HS ↓``."""
        return f"{self.label} {self.arrow}" if self.arrow else self.label

    @property
    def threshold(self) -> str | None:
        """The gate's threshold field: ``max_hs``, ``min_fa``, ...; None for a metric the gate does not check."""
        if self.gate is None:
            return None
        return f"{'min' if self.higher_is_better else 'max'}_{self.gate}"


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("harmful_score", "HS", "HS", "harmful score", higher_is_better=False, gate="hs"),
        # HS+ counts degenerate answers as harmful too: the papers' HS credits a collapsed model with safety.
        Metric(
            "harmful_score_plus",
            "HS+",
            "HS+",
            "harmful score counting degenerate answers",
            higher_is_better=False,
            gate="hs_plus",
        ),
        # After an attack that teaches a trigger (jailbreak-tuning's template, a persona; docs/attacks.md): the
        # harmful prompts asked as the attacker asks them. Only those runs have it, so it is not in every table.
        Metric(
            "harmful_score_triggered",
            "HS trig.",
            "HS-trig",
            "harmful score on prompts wrapped in the attack's trigger",
            higher_is_better=False,
            headline=False,
            always=False,
        ),
        Metric("finetune_accuracy", "FA", "FA", "fine-tune accuracy", higher_is_better=True, gate="fa"),
        Metric(
            "over_refusal",
            "over-refusal",
            "OR",
            "over-refusal rate",
            higher_is_better=False,
            gate="over_refusal",
        ),
        # Ordinary benign instructions (AlpacaEval), not XSTest's borderline ones: a helpful-and-harmless aligned
        # model must answer them (docs/methods.md, CPU scale).
        Metric(
            "instruction_refusal",
            "IR",
            "IR",
            "refusal rate on ordinary benign instructions",
            higher_is_better=False,
        ),
        Metric("degenerate_rate", "degenerate", "degenerate", "degenerate answers", higher_is_better=None),
        # Over-refusal alone would call a model that answers benign prompts with nothing perfect.
        Metric(
            "benign_degenerate_rate",
            "benign degenerate",
            "benign degenerate",
            "degenerate answers to benign prompts",
            higher_is_better=None,
        ),
        Metric(
            "repetitive_rate",
            "repetitive",
            "repetitive",
            "repetitive answers",
            higher_is_better=None,
            counted=False,
        ),
    )
}

# The metrics with a direction: the sweep's tables, the verdicts against a baseline and the gate's thresholds.
HEADLINE: tuple[str, ...] = tuple(
    k for k, m in METRICS.items() if m.higher_is_better is not None and m.headline
)
# A run's table (results.md, `ftguard compare`): the headline metrics and the degenerate rate that explains HS+.
RUN_TABLE: tuple[str, ...] = (*HEADLINE, "degenerate_rate")
# The gate lists ceilings before floors (HS, HS+, over-refusal, then FA), as its verdict tables always have.
GATED: tuple[str, ...] = tuple(
    sorted((k for k in HEADLINE if METRICS[k].gate), key=lambda k: bool(METRICS[k].higher_is_better))
)

INTERVAL_NOTE = "In parentheses: 95% Wilson intervals over the prompts."


def fmt(value: Any) -> str:
    """One decimal for a rate, "–" for a missing one."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def cell(value: float | None, interval: Sequence[float] | None) -> str:
    """``76.6 (65.0–85.2)``: the rate and its 95% Wilson interval, when there is one."""
    if value is None or interval is None:
        return fmt(value)
    return f"{value:.1f} ({interval[0]:.1f}–{interval[1]:.1f})"
