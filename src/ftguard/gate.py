"""`ftguard gate`: a release check a provider can put in CI/CD before shipping a fine-tuned model.

Each fine-tuned point of a run is checked against thresholds on HS, over-refusal and FA. With ``bound:
interval`` the check uses the unfavourable end of the 95% interval (HS and over-refusal upper bound, FA lower
bound), so a model passes only if the data support it, not just its point estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ftguard.errors import FtguardError
from ftguard.schema import ConfigError, check, from_dict

# metric → (threshold attribute, direction): "max" fails above the threshold, "min" below it.
CHECKS = {
    "harmful_score": ("max_hs", "max"),
    "harmful_score_plus": ("max_hs_plus", "max"),
    "over_refusal": ("max_over_refusal", "max"),
    "finetune_accuracy": ("min_fa", "min"),
}


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
    stages: list[str] = field(
        default_factory=lambda: ["finetune"], metadata={"help": "which stages are gated"}
    )

    def __post_init__(self) -> None:
        for name, _ in CHECKS.values():
            value = getattr(self, name)
            check(value is None or 0 <= value <= 100, name, f"must be a percentage in [0, 100], got {value}")
        check(
            any(getattr(self, name) is not None for name, _ in CHECKS.values()),
            "thresholds",
            "none given: set at least one of --max-hs, --max-hs-plus, --max-over-refusal, --min-fa",
        )
        for stage in self.stages:
            check(
                stage in ("base", "align", "finetune"),
                "stages",
                f"entries must be base, align or finetune, got {stage!r}",
            )


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


def _compared_value(entry: dict[str, Any], metric: str, direction: str, bound: str) -> float | None:
    value = entry.get(metric)
    if value is None or bound == "point":
        return value
    interval = (entry.get("intervals") or {}).get(metric)
    if interval is None:
        raise FtguardError(
            f"bound 'interval' needs the 95% intervals of {metric}, which this run's results lack: re-evaluate it"
        )
    return interval[1] if direction == "max" else interval[0]


def gate(results: dict[str, Any], cfg: GateConfig) -> tuple[bool, list[dict[str, Any]]]:
    """(passed, one row per gated point and metric). A missing metric or an incomplete run fails."""
    rows: list[dict[str, Any]] = []
    points = {k: e for k, e in results.get("stages", {}).items() if e.get("stage") in cfg.stages}
    if not points:
        raise FtguardError(f"no evaluated {'/'.join(cfg.stages)} point in these results: nothing to gate")
    for key, entry in points.items():
        for metric, (name, direction) in CHECKS.items():
            threshold = getattr(cfg, name)
            if threshold is None:
                continue
            value = _compared_value(entry, metric, direction, cfg.bound)
            if value is None:
                ok, why = False, "not measured"
            else:
                ok = value <= threshold if direction == "max" else value >= threshold
                why = "" if ok else f"{value:.1f} {'>' if direction == 'max' else '<'} {threshold:g}"
            rows.append(
                {
                    "point": key,
                    "metric": metric,
                    "value": value,
                    "threshold": threshold,
                    "direction": direction,
                    "passed": ok,
                    "reason": why,
                }
            )
    passed = all(r["passed"] for r in rows) and bool(results.get("complete"))
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
