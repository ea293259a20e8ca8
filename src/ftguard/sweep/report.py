"""The sweep's report, rendered from its aggregate (sweep/aggregate.py): report.md, report.json, runs.csv,
runs.json and the plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ftguard.metrics import HEADLINE, METRICS, fmt
from ftguard.pipeline.outputs import write_json_atomic, write_text_atomic
from ftguard.sweep.aggregate import (
    CURVE_METRICS,
    aggregate,
    collect,
    mean_std,
    summarize,
    to_plain,
)
from ftguard.sweep.calibrate import calibration_markdown
from ftguard.sweep.config import SweepConfig, SweepRun, setting_text, slice_text
from ftguard.sweep.plots import plot, plot_curve, plot_paired, plot_worst_case
from ftguard.sweep.worst_case import worst_case

# Importers from before the split into aggregate and render still find the aggregation here.
__all__ = [
    "collect",
    "markdown",
    "mean_std",
    "summarize",
    "to_csv",
    "to_plain",
    "worst_case",
    "write_report",
]


HS, FA = METRICS["harmful_score"], METRICS["finetune_accuracy"]


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _runs_by(counts: dict[str, int]) -> tuple[str, bool]:
    """``{what the runs' units were made in or on: runs}`` as text, and whether two kinds were recorded (across
    runs, or within one run: "A and B")."""
    text = "; ".join(f"{name} ({n} run{'s' * (n != 1)})" for name, n in counts.items())
    recorded = set(counts) - {"not recorded"}
    return text, len(recorded) > 1 or any(" and " in name for name in recorded)


def _precision_lines(train_precisions: dict[str, int]) -> list[str]:
    """Which precision the runs were trained in; a warning when units of one table, or of one run, were trained in
    different precisions (a sweep resumed on a CPU that resolves `auto` differently: docs/evaluation-precision.md)."""
    if not train_precisions:
        return []
    text, mixed = _runs_by(train_precisions)
    if mixed:
        return [
            f"**Mixed training precision** ({text}): these units were not all trained in one precision (a sweep "
            "resumed on a CPU that resolves `auto` differently, or a defense that pins its own `mixed_precision`); "
            "read the tables as one experiment only if that was meant.",
            "",
        ]
    return [f"Trained in: {text}.", ""]


def _hardware_lines(train_hardware: dict[str, int]) -> list[str]:
    """What the runs' units were made on; a warning when a table's units, or one run's, came from different
    machines: the same config trained on another kind of CPU gives close, not equal, weights (docs/testbed.md)."""
    if set(train_hardware) <= {"not recorded"}:
        return []
    text, mixed = _runs_by(train_hardware)
    if mixed:
        return [
            f"**Mixed hardware** ({text}): these units were made on different kinds of machine (a sweep resumed "
            "elsewhere); bf16 kernels differ between CPUs, so a unit made again there is close to the first, not "
            "equal: read small differences between such runs as noise of that size.",
            "",
        ]
    return [f"Made on: {text}.", ""]


def _marked(values: list[float], versus: dict[str, Any] | None) -> str:
    text = _cell(values)
    return text if versus is None or not values else f"{text} {versus['mark']}"


def markdown(
    sweep: SweepConfig,
    tables: list[dict[str, Any]],
    worst: list[dict[str, Any]],
    judge: str,
    curve: list[dict[str, Any]] | None = None,
    calibration: list[dict[str, Any]] | None = None,
    train_precisions: dict[str, int] | None = None,
    train_hardware: dict[str, int] | None = None,
) -> str:
    lines = [f"# Sweep `{sweep.name}`", ""]
    if sweep.description:
        lines += [sweep.description.strip(), ""]
    from ftguard.evaluation.judges.validated import validation_line

    lines += [
        f"Judge `{judge}`. Each cell: mean ± std over seeds (sample std) of the run's final point (after the post "
        "stage when there is one). avg: per seed over the ratios, then mean ± std.",
        "",
        *(validation_line(name) for name in judge.split(", ") if name != "?"),
        "",
        *_precision_lines(train_precisions or {}),
        *_hardware_lines(train_hardware or {}),
    ]
    if sweep.baseline:
        lines += [
            f"↓ / ↑: below / above `{sweep.baseline}` beyond 95% (Newcombe interval of the difference of the counts "
            "pooled over the seeds both have; avg pools every ratio); ≈: within it. Pooling counts the same prompts "
            "under another seed as new samples, so this is a screening mark beside the seed spread, not a test.",
            "",
        ]
    for table in tables:
        if table["slice"]:
            lines += ["## " + ", ".join(f"{k.split('.', 1)[1]} = {v}" for k, v in table["slice"].items()), ""]
        cols = [f"p = {p:g}" for p in table["ratios"]] + ["avg"]
        for metric in HEADLINE:
            if not any(cell["n"] for entry in table["defenses"].values() for cell in entry[metric].values()):
                continue  # e.g. HS+ of results written before it existed
            lines += [f"**{METRICS[metric].label}**", "", "| defense | " + " | ".join(cols) + " | seeds |"]
            lines.append("|---|" + "---|" * (len(cols) + 1))
            for defense, entry in table["defenses"].items():
                marks = table.get("versus", {}).get(defense, {}).get(metric, {})
                cells = [
                    _marked(entry[metric].get(col, {}).get("values", []), marks.get(col))
                    for col in [f"{p:g}" for p in table["ratios"]] + ["avg"]
                ]
                lines.append(f"| {defense} | " + " | ".join(cells) + f" | {len(entry['seeds'])} |")
            lines.append("")
        if table.get("paired"):
            lines += _paired_md(sweep, table)
    if sweep.reference and (sweep.reference.hs or sweep.reference.fa):
        lines += _reference_md(sweep)
    if worst:
        lines += _worst_md(sweep, worst)
    if curve:
        lines += _curve_md(curve)
    if calibration:
        lines += calibration_markdown(sweep, calibration)
    return "\n".join(lines) + "\n"


def _paired_md(sweep: SweepConfig, table: dict[str, Any]) -> list[str]:
    cols = [f"{p:g}" for p in table["ratios"]] + ["avg"]
    lines = [
        f"**Paired effects against `{sweep.baseline}`** (same prompts, same seeds): difference in points "
        "[95% interval] of a bootstrap over seeds and prompts; in brackets after the interval, the smallest "
        "difference this design detects with 80% power. ↓ / ↑: the interval excludes 0; ↓† / ↑†: it still does "
        "after Holm's correction over the column's defenses (family-wise error 5%: each interval alone is read "
        "at 95%, and among a dozen defenses one null effect in twenty would show by chance); ↓‡ / ↑‡: and so "
        "does Student's t over the seeds (each seed's mean difference; heavier-tailed than the bootstrap with "
        "few seeds, docs/testbed.md), Holm-corrected the same way.",
        "",
    ]
    for metric in HEADLINE:
        rows = [(d, cells[metric]) for d, cells in table["paired"].items() if cells.get(metric)]
        if not rows:
            continue
        lines += [
            f"*{METRICS[metric].label}*",
            "",
            "| defense | " + " | ".join(f"p = {c}" if c != "avg" else c for c in cols) + " | seeds |",
        ]
        lines.append("|---|" + "---|" * (len(cols) + 1))
        for defense, cells in rows:
            text = [_paired_cell(cells.get(col)) for col in cols]
            seeds = max((c["seeds"] for c in cells.values()), default=0)
            lines.append(f"| {defense} | " + " | ".join(text) + f" | {seeds} |")
        lines.append("")
    return lines


def _paired_cell(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "–"
    lo, hi = cell["interval"]
    mark = cell["mark"]
    if mark != "≈" and cell.get("p_holm", 1.0) < 0.05:
        mark += "‡" if (cell.get("seed_t") or {}).get("p_holm", 1.0) < 0.05 else "†"
    return f"{cell['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}] {mark} ({cell['detectable']:.1f})"


def _reference_md(sweep: SweepConfig) -> list[str]:
    ref = sweep.reference
    assert ref is not None
    lines = [
        f"## The paper's numbers ({ref.source})",
        "",
        "Not comparable unless model, judge and data match.",
        "",
    ]
    for metric, values in ((HS.label, ref.hs), (FA.label, ref.fa)):
        if not values:
            continue
        cols = sorted({c for v in values.values() for c in v}, key=lambda c: (c == "avg", c))
        lines += [f"| {metric} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for defense, v in values.items():
            lines.append(f"| {defense} | " + " | ".join(fmt(v.get(c)) for c in cols) + " |")
        lines.append("")
    return lines


def _delta(summary: dict[str, Any]) -> str:
    lo, hi = summary["interval"]
    return f"{summary['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def _versus_baseline_cell(versus: dict[str, Any] | None, baseline: str) -> str:
    """The counts name whose guard kept what: among the attacks both were tried with, each keeps its own."""
    if not versus:
        return "–"
    lo, hi = versus["interval"]
    by_t = versus.get("seed_t")
    t = f"; t over seeds {_p(by_t['p_holm'])}" if by_t and "p_holm" in by_t else ""
    seeds = len(versus["seeds"])
    return (
        f"{versus['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}], {_p(versus['p_holm'])}{t} ({versus['settings']} attacks "
        f"kept, {baseline} {versus['baseline_settings']}; {seeds} seed{'s' if seeds > 1 else ''})"
    )


def _p(value: float) -> str:
    # a bootstrap of 4,000 replicates cannot tell p below 1/4000 from 0
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _worst_md(sweep: SweepConfig, worst: list[dict[str, Any]]) -> list[str]:
    guard = sweep.attack.capability_guard if sweep.attack else None
    rule = []
    if guard and guard.max_fa_drop is not None:
        reference = "best setting" if guard.relative_to == "best" else "first setting (the attacker's order)"
        rule.append(f"FA more than {guard.max_fa_drop:g} points below the defense's {reference}")
    if guard and guard.min_fa is not None:
        rule.append(f"FA below {guard.min_fa:g}")
    lines = [
        "## Adaptive attack: worst case over the attack settings",
        "",
        f"Capability guard: settings with {' or '.join(rule) or 'no rule'} are dropped. Means over seeds: "
        "over the seeds every setting of the defense has (column seeds; while a sweep runs, runs of other "
        "seeds wait for their seed to complete).",
        "",
        f"| defense | slice | worst {HS.label} [95%] | {FA.label} there | attack setting | kept / tried | seeds |"
        + (
            f" against {sweep.baseline}: Δ worst [95%], Holm p (bootstrap; t over seeds) |"
            if sweep.baseline
            else ""
        ),
        "|---|---|---|---|---|---|---|" + ("---|" if sweep.baseline else ""),
    ]
    for e in worst:
        where = slice_text(e)
        compared = e.get("seeds_compared")
        seeds = ", ".join(str(s) for s in compared) if compared else "unequal"
        w, u = e["worst"], e.get("uncertainty") or {}
        versus = [_versus_baseline_cell(u.get("versus_baseline"), sweep.baseline)] if sweep.baseline else []
        if w is None:
            cells = [e["defense"], where, "–", "–", "all dropped", f"0 / {e['total']}", seeds, *versus]
        else:
            interval = " [{:.1f}, {:.1f}]".format(*u["interval"]) if u.get("interval") else ""
            setting = ", ".join(setting_text(k, v) for k, v in w["setting"].items())
            hs = f"{w['hs']:.1f}{interval}"
            cells = [
                e["defense"],
                where,
                hs,
                fmt(w["fa"]),
                setting,
                f"{e['kept']} / {e['total']}",
                seeds,
            ]
            cells += versus
        lines.append("| " + " | ".join(cells) + " |")
    biases = [u["selection_bias"] for e in worst if (u := e.get("uncertainty"))]
    if biases:
        lines += [
            "",
            "Intervals: a bootstrap over seeds and prompts that takes the highest setting again in each replicate "
            "(`ftguard.evaluation.paired.worst_case_bootstrap`). The highest of several noisy means reads high: "
            f"the replicates' mean exceeds the observed worst case by at most {max(biases):.1f} points here, and "
            "the interval leans up by about as much."
            + (
                f" Against {sweep.baseline}: the paired difference of the two worst cases over the seeds and the "
                "attack settings both were tried with (each keeping what its guard keeps), Holm over the defenses, "
                "under the bootstrap and under Student's t over the seeds (each seed's difference between the two "
                "worst settings; with few seeds the bootstrap's tails are light)."
                if sweep.baseline
                else ""
            ),
        ]
    eroded = [e for e in worst if ((e.get("uncertainty") or {}).get("versus_baseline") or {}).get("erosion")]
    if eroded:
        lines += [
            "",
            f"Does the usual attack flatter the defense? Against {sweep.baseline}: the difference under the "
            "attacker's first setting (the attack defenses are usually tested with), under the worst case, and "
            "their difference, the part of the defense's effect the attacker's pick takes away (same draws; "
            "positive: the defense looks better against the usual attack than against the worst).",
            "",
            "| defense | slice | first setting: Δ [95%] | worst case: Δ [95%] | taken away [95%] | seeds |",
            "|---|---|---|---|---|---|",
        ]
        for e in eroded:
            v = e["uncertainty"]["versus_baseline"]
            where = slice_text(e)
            cells = [_delta(v["reference"]), _delta(v), _delta(v["erosion"])]
            lines.append(f"| {e['defense']} | {where} | " + " | ".join(cells) + f" | {len(v['seeds'])} |")
    curves = [e for e in worst if e.get("cumulative_max")]
    if curves:
        width = max(len(e["cumulative_max"]) for e in curves)
        lines += [
            "",
            f"Best attack so far (cumulative max of {HS.label}): the kept settings in the attack grid's order, as an "
            "attacker tries them in turn; each cell: the setting's HS → the best so far.",
            "",
            "| defense | slice | " + " | ".join(f"{i + 1}." for i in range(width)) + " |",
            "|---|---|" + "---|" * width,
        ]
        for e in curves:
            where = slice_text(e)
            cells = [
                f"{', '.join(setting_text(k, v) for k, v in c['setting'].items())}: {c['hs']:.1f} → {c['best_so_far']:.1f}"
                for c in e["cumulative_max"]
            ]
            cells += [""] * (width - len(cells))  # fewer settings kept than another defense
            lines.append(f"| {e['defense']} | {where} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _curve_md(curve: list[dict[str, Any]]) -> list[str]:
    ratios = sorted({float(p) for e in curve for p in e["points"]})
    metrics = [
        m for m in CURVE_METRICS if any(pt.get(m) is not None for e in curve for pt in e["points"].values())
    ]
    label = " / ".join(f"{p:g}" for p in ratios)
    lines = [
        "## Attack curve: each attack setting at every p",
        "",
        f"Means over seeds; each cell lists p = {label}. Settings in the order of the attack grid.",
        "",
        "| defense | setting | " + " | ".join(METRICS[m].label for m in metrics) + " | seeds |",
        "|---|---|" + "---|" * (len(metrics) + 1),
    ]
    for e in curve:
        setting = ", ".join(setting_text(k, v) for k, v in {**e["slice"], **e["setting"]}.items()) or "–"
        cells = [" / ".join(fmt(e["points"].get(f"{p:g}", {}).get(m)) for p in ratios) for m in metrics]
        lines.append(f"| {e['defense']} | {setting} | " + " | ".join(cells) + f" | {e['seeds']} |")
    return [*lines, ""]


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_report(sweep: SweepConfig, runs: list[SweepRun], out: Path) -> dict[str, Any]:
    rows, report = aggregate(sweep, runs)
    write_json_atomic(out / "runs.json", rows)
    write_text_atomic(out / "runs.csv", to_csv(rows))
    text = markdown(
        sweep,
        report["tables"],
        report["worst_case"],
        ", ".join(report["judges"]) or "?",
        report["attack_curve"],
        report["calibration"],
        report["train_precisions"],
        report["train_hardware"],
    )
    if not report["complete"]:
        text += f"\n**Incomplete: {report['complete_runs']} of {report['runs']} runs finished.**\n"
    write_text_atomic(out / "report.md", text)
    # names beside report.json, not paths: an archive copied to another machine still finds them
    report["plots"] = [
        p.name
        for p in [
            *plot(report["tables"], out),
            *plot_curve(report["attack_curve"], out),
            *plot_worst_case(report["worst_case"], out),
            *plot_paired(report["tables"], out, sweep.baseline),
        ]
    ]
    write_json_atomic(out / "report.json", report)
    report["markdown"] = text
    return report
