"""How well a judge and the refusal detector agree with people's labels, overall and per source.

Two binary questions, each scored only on rows labelled for it: **harm** (positive = harmful; what HS counts)
and **refusal** (positive = refusal; what over-refusal counts). Every rate comes with its 95% Wilson interval.
A rate whose denominator is empty (recall on a source with no harmful answer) is None, never a made-up 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftguard.evaluation.labelled import LabelledAnswer
from ftguard.evaluation.stats import wilson_interval

TASKS = ("harm", "refusal")
RATES = ("accuracy", "precision", "recall", "fpr")


def binary_metrics(predicted: Sequence[bool], truth: Sequence[bool]) -> dict[str, Any]:
    """{n, positives, tp, fp, fn, tn, accuracy, precision, recall, fpr, ci95}; rates as fractions in [0, 1]."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} labels")
    tp = sum(p and t for p, t in zip(predicted, truth, strict=True))
    fp = sum(p and not t for p, t in zip(predicted, truth, strict=True))
    fn = sum(t and not p for p, t in zip(predicted, truth, strict=True))
    tn = len(truth) - tp - fp - fn
    parts = {
        "accuracy": (tp + tn, len(truth)),
        "precision": (tp, tp + fp),
        "recall": (tp, tp + fn),
        "fpr": (fp, fp + tn),
    }
    out: dict[str, Any] = {"n": len(truth), "positives": tp + fn, "tp": tp, "fp": fp, "fn": fn, "tn": tn}
    out |= {name: (k / n if n else None) for name, (k, n) in parts.items()}
    out["ci95"] = {
        name: ([v / 100 for v in wilson_interval(k, n)] if n else None) for name, (k, n) in parts.items()
    }
    return out


def _label(row: LabelledAnswer, task: str) -> bool | None:
    return row.harmful if task == "harm" else row.refusal


def task_report(
    rows: Sequence[LabelledAnswer], predicted: Sequence[bool], task: str
) -> dict[str, Any] | None:
    """{overall, by_source} on the rows labelled for ``task``; None when no row is."""
    if len(rows) != len(predicted):
        raise ValueError(f"{len(predicted)} predictions for {len(rows)} rows")
    pairs = [
        (r.source, p, _label(r, task))
        for r, p in zip(rows, predicted, strict=True)
        if _label(r, task) is not None
    ]
    if not pairs:
        return None
    sources = sorted({s for s, _, _ in pairs})
    return {
        "overall": binary_metrics([p for _, p, _ in pairs], [t for _, _, t in pairs]),
        "by_source": {
            s: binary_metrics([p for src, p, _ in pairs if src == s], [t for src, _, t in pairs if src == s])
            for s in sources
        },
    }


def _pct(metrics: dict[str, Any], name: str) -> str:
    value, ci = metrics[name], metrics["ci95"][name]
    if value is None:
        return "–"
    return f"{100 * value:.1f} ({100 * ci[0]:.0f}–{100 * ci[1]:.0f})"


def markdown_report(report: dict[str, Any], title: dict[str, str] | None = None) -> str:
    """One table per task: a row per source and one overall; each rate with its 95% interval in brackets."""
    title = title or {"harm": "harm (positive = harmful)", "refusal": "refusal (positive = refusal)"}
    lines: list[str] = []
    for task in TASKS:
        part = report.get(task)
        if not part:
            continue
        lines += [
            f"**{title[task]}**",
            "",
            "| source | n | positives | accuracy % | precision % | recall % | FPR % |",
            "|---|---|---|---|---|---|---|",
        ]
        named = [*part["by_source"].items(), ("overall", part["overall"])]
        for source, m in named:
            shown = f"**{source}**" if source == "overall" else source
            lines.append(
                f"| {shown} | {m['n']} | {m['positives']} | "
                + " | ".join(_pct(m, name) for name in RATES)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)
