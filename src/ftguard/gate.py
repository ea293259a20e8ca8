"""`ftguard gate`: a release check a provider can put in CI/CD before shipping a fine-tuned model.

By default each run's final point is checked (per harmful ratio, the repaired model when the run has a post
stage, else the fine-tuned one: the model the provider ships); ``stages`` names others. Thresholds bound HS, HS+,
over-refusal and FA. With ``bound: interval`` the check uses the unfavourable end of the 95% interval (HS and
over-refusal upper bound, FA lower bound), so a model passes only if the data support it, not just its point
estimate.

``--worst-case`` gates a sweep instead of a run: each defense's worst case over the attack settings of the sweep's
``attack:`` block (report.json, sweep/aggregate.py ``worst_case``), i.e. the highest attacker HS among the settings
the capability guard kept and the FA at that setting, against max_hs / min_fa. With ``bound: interval`` HS is the
upper end of the worst case's 95% interval (a bootstrap that picks the worst setting again in each replicate,
sweep/worst_case.py); FA has no such interval there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ftguard.errors import FtguardError
from ftguard.metrics import GATED, METRICS
from ftguard.run_results import STAGES, Point, RunResults, parse_results
from ftguard.schema import ConfigError, check, from_dict

# metric → (threshold attribute, direction): "max" fails above the threshold, "min" below it.
CHECKS = {m: (str(METRICS[m].threshold), "min" if METRICS[m].higher_is_better else "max") for m in GATED}


@dataclass
class GateConfig:
    max_hs: float | None = field(default=None, metadata={"help": "highest acceptable harmful score (%)"})
    max_hs_plus: float | None = field(default=None, metadata={"help": "highest acceptable HS+ (%)"})
    max_over_refusal: float | None = field(
        default=None, metadata={"help": "highest acceptable over-refusal rate (%)"}
    )
    min_fa: float | None = field(default=None, metadata={"help": "lowest acceptable fine-tune accuracy (%)"})
    bound: Literal["point", "interval"] = field(
        default="point",
        metadata={"help": "compare the point estimate, or the unfavourable end of the 95% interval"},
    )
    stages: list[str] | None = field(
        default=None,
        metadata={
            "help": "which stages are gated (base, align, finetune, post); default: each run's final point, "
            "post if evaluated, else finetune"
        },
    )

    def __post_init__(self) -> None:
        for name, _ in CHECKS.values():
            value = getattr(self, name)
            check(value is None or 0 <= value <= 100, name, f"must be a percentage in [0, 100], got {value}")
        check(
            any(getattr(self, name) is not None for name, _ in CHECKS.values()),
            "thresholds",
            "none given: set at least one of "
            + ", ".join(f"--{name.replace('_', '-')}" for name, _ in CHECKS.values()),
        )
        if self.stages is not None:
            check(
                bool(self.stages), "stages", "is empty: name a stage, or leave it out to gate the final point"
            )
            for stage in self.stages:
                check(stage in STAGES, "stages", f"entries must be among {', '.join(STAGES)}, got {stage!r}")


def load_gate_config(path: str | None, overrides: dict[str, Any]) -> GateConfig:
    data: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise FtguardError(f"gate thresholds file {path} not found")
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of thresholds")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(GateConfig, data, prefix="gate")


def _compared_value(point: Point, metric: str, direction: str, bound: str) -> float | None:
    value = point.value(metric)
    if value is None or bound == "point":
        return value
    interval = point.intervals.get(metric)
    if interval is None:
        raise FtguardError(
            f"bound 'interval' needs the 95% intervals of {metric}, which this run's results lack: re-evaluate it"
        )
    return interval[1] if direction == "max" else interval[0]


def gated_points(run: RunResults, stages: list[str] | None) -> list[Point]:
    """The points ``stages`` names, or the run's final points; an unevaluated shipped model is an error."""
    if stages is not None:
        points = run.select(stages)
        if not points:
            raise FtguardError(f"no evaluated {'/'.join(stages)} point in these results: nothing to gate")
        return points
    shipped = run.last_trained_stage()
    points = run.final_points()
    if shipped is not None and not any(p.stage == shipped for p in points):
        # Gating the last evaluated model instead would pass a model the provider does not ship.
        if not run.complete:
            raise FtguardError(
                f"the run is incomplete and its {shipped} stage not evaluated yet: finish it (`ftguard run` on its "
                "config) before gating"
            )
        raise FtguardError(
            f"the run ends with its {shipped} stage, but no {shipped} point was evaluated: add {shipped} to "
            "evaluate.points and run it again, or name the stages to gate (--stages / stages:)"
        )
    if not points:
        raise FtguardError("no evaluated point in these results: nothing to gate")
    return points


def gate(results: RunResults | dict[str, Any], cfg: GateConfig) -> tuple[bool, list[dict[str, Any]]]:
    """(passed, one row per gated point and metric). A missing metric or an incomplete run fails."""
    run = results if isinstance(results, RunResults) else parse_results(results)
    rows: list[dict[str, Any]] = []
    for point in gated_points(run, cfg.stages):
        for metric, (name, direction) in CHECKS.items():
            threshold = getattr(cfg, name)
            if threshold is None:
                continue
            value = _compared_value(point, metric, direction, cfg.bound)
            if value is None:
                ok, why = False, "not measured"
            else:
                ok = value <= threshold if direction == "max" else value >= threshold
                why = "" if ok else f"{value:.1f} {'>' if direction == 'max' else '<'} {threshold:g}"
            rows.append(
                {
                    "point": point.key,
                    "metric": metric,
                    "value": value,
                    "threshold": threshold,
                    "direction": direction,
                    "passed": ok,
                    "reason": why,
                }
            )
    passed = all(r["passed"] for r in rows) and run.complete
    return passed, rows


def verdict_table(rows: list[dict[str, Any]], passed: bool, complete: bool, bound: str) -> str:
    what = "upper/lower 95% bound" if bound == "interval" else "point estimate"
    lines = [f"| point | metric | {what} | threshold | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        value = "–" if r["value"] is None else f"{r['value']:.1f}"
        sign = "≤" if r["direction"] == "max" else "≥"
        verdict = "pass" if r["passed"] else f"**FAIL** ({r['reason']})"
        lines.append(f"| {r['point']} | {r['metric']} | {value} | {sign} {r['threshold']:g} | {verdict} |")
    if not complete:
        lines += ["", "**FAIL**: the run is incomplete (results.json has complete: false)."]
    lines += ["", f"Release gate: {'PASSED' if passed else 'FAILED'}"]
    return "\n".join(lines) + "\n"


# The worst case of a sweep (sweep/aggregate.py) records, per defense, the attacker's HS and the FA there only.
WORST_CASE_VALUES = {"harmful_score": "hs", "finetune_accuracy": "fa"}


def read_sweep_report(path: str | Path) -> dict[str, Any]:
    """A sweep's report.json, from its output folder or the file itself; a sweep without a worst case fails."""
    file = Path(path)
    file = file / "report.json" if file.is_dir() else file
    if not file.is_file():
        raise FtguardError(f"{file}: no sweep report here (--worst-case reads a sweep's output folder)")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FtguardError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(report, dict) or not report.get("worst_case"):
        raise FtguardError(
            f"{file}: no worst case to gate (the sweep has no attack: block, or none of its runs finished): give "
            "it attack: {grid: {data.finetune.attack: [...]}}, or gate a single run's results.json"
        )
    return report


def gate_worst_case(report: dict[str, Any], cfg: GateConfig) -> tuple[bool, list[dict[str, Any]]]:
    """(passed, one row per defense, grid slice and metric): each defense's worst case over the attack settings the
    capability guard kept (HS as the attacker asks, through the trigger when higher) and the FA at that setting,
    against the thresholds. A defense whose every setting was dropped fails: nothing shows it resists. An
    incomplete sweep fails, as an incomplete run does (its worst case may miss the strongest attack)."""
    unsupported = [
        name
        for metric, (name, _) in CHECKS.items()
        if metric not in WORST_CASE_VALUES and getattr(cfg, name) is not None
    ]
    if cfg.bound == "interval" and cfg.min_fa is not None:
        raise ConfigError(
            "'min_fa' is not gated with --worst-case and bound 'interval': the worst case has a 95% interval for "
            "HS only (gate FA with bound 'point' in a second call)"
        )
    unsupported += ["stages"] if cfg.stages is not None else []
    if unsupported:
        raise ConfigError(
            f"'{unsupported[0]}' is not gated with --worst-case: the worst case holds means over seeds of HS and FA "
            "only (set max_hs / min_fa)"
        )
    rows: list[dict[str, Any]] = []
    for entry in report["worst_case"]:
        worst = entry.get("worst")
        for metric, (name, direction) in CHECKS.items():
            threshold = getattr(cfg, name)
            if threshold is None:
                continue
            value = None if worst is None else worst.get(WORST_CASE_VALUES[metric])
            if worst is not None and cfg.bound == "interval":
                value = ((entry.get("uncertainty") or {}).get("interval") or [None, None])[1]
            if worst is None:
                dropped = f"every attack setting dropped by the capability guard (0 / {entry['total']} kept)"
                ok, why = False, dropped
            elif value is None:
                ok, why = (
                    False,
                    "not measured" if cfg.bound == "point" else "no interval (runs without outcomes)",
                )
            else:
                ok = value <= threshold if direction == "max" else value >= threshold
                why = "" if ok else f"{value:.1f} {'>' if direction == 'max' else '<'} {threshold:g}"
            rows.append(
                {
                    "defense": entry["defense"],
                    "slice": entry.get("slice") or {},
                    "attack": None if worst is None else worst["setting"],
                    "metric": metric,
                    "value": value,
                    "threshold": threshold,
                    "direction": direction,
                    "passed": ok,
                    "reason": why,
                }
            )
    passed = all(r["passed"] for r in rows) and bool(report.get("complete"))
    return passed, rows


def _setting_text(setting: dict[str, Any]) -> str:
    return ", ".join(
        f"{k.split('.')[-1]} = {v:g}" if isinstance(v, float) else f"{k.split('.')[-1]} = {v}"
        for k, v in setting.items()
    )


def worst_case_table(
    rows: list[dict[str, Any]], passed: bool, report: dict[str, Any], bound: str = "point"
) -> str:
    what = "upper 95% bound of the worst case" if bound == "interval" else "worst case (mean over seeds)"
    lines = [
        f"| defense | metric | {what} | threshold | reached by | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        defense = r["defense"] + (f" ({_setting_text(r['slice'])})" if r["slice"] else "")
        value = "–" if r["value"] is None else f"{r['value']:.1f}"
        sign = "≤" if r["direction"] == "max" else "≥"
        attack = "–" if r["attack"] is None else _setting_text(r["attack"])
        verdict = "pass" if r["passed"] else f"**FAIL** ({r['reason']})"
        lines.append(
            f"| {defense} | {r['metric']} | {value} | {sign} {r['threshold']:g} | {attack} | {verdict} |"
        )
    if not report.get("complete"):
        done = f"{report.get('complete_runs', '?')} of {report.get('runs', '?')}"
        lines += [
            "",
            f"**FAIL**: the sweep is incomplete ({done} runs finished): its worst case may miss an attack.",
        ]
    lines += ["", f"Release gate (worst case over the attacks): {'PASSED' if passed else 'FAILED'}"]
    return "\n".join(lines) + "\n"
