"""`ftguard gate RUN --policy policy.yaml`: a release policy, rules a provider writes once and CI checks each run by.

A rule bounds one metric of the gated points (by default each run's final point per harmful ratio, as the
threshold gate does) either absolutely (``max:`` / ``min:``) or against a baseline point (``relative_to:`` with
``max_rise:`` / ``max_drop:`` in percentage points): the aligned model of the same run, its fine-tune, a point key,
or a point of another run (``{run: PATH, point: finetune}``, e.g. the undefended fine-tune). A ``must_pass`` rule
blocks the release; a ``warn`` rule is printed and recorded but never changes the exit code.

Fail closed: a must_pass rule whose metric, baseline point, baseline run or 95% interval is missing fails, with the
reason; a warn rule with missing data warns. An incomplete run fails, as with the threshold gate.

With ``bound: interval`` the gated point's value is the unfavourable end of its 95% interval (upper for a
lower-is-better metric, lower for FA); a baseline is taken at its estimate, so the interval is not counted twice.
A limit's direction must agree with the metric's (``max``/``max_rise`` for HS, ``min``/``max_drop`` for FA): a
floor on HS is almost surely a mistake, and the interval's "unfavourable end" would be undefined for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ftguard.errors import FtguardError
from ftguard.gate import gated_points
from ftguard.metrics import METRICS
from ftguard.run_results import STAGES, Point, RunResults, read_results
from ftguard.schema import ConfigError, check, from_dict, to_dict

# Metrics with a direction can be bounded; the diagnostic ones (degenerate rate, ...) cannot.
DIRECTED = tuple(k for k, m in METRICS.items() if m.higher_is_better is not None)
STAGE_WORDS = {"aligned": "align"}  # relative_to in words, besides the stage names themselves
POLICIES_DIR = Path(__file__).parent / "configs" / "policies"


def metric_key(name: str) -> str | None:
    """A metric's key from its key, label or abbreviation (``HS``, ``fa``, ``over-refusal``), if it has a direction."""
    if name in DIRECTED:
        return name
    low = name.strip().lower()
    return next((k for k in DIRECTED if low in (METRICS[k].label.lower(), METRICS[k].abbrev.lower())), None)


def _check_point_name(name: str, key: str) -> None:
    # A point key is its stage, with -p<ratio> per harmful ratio (run_results reads it the same way): catching a
    # typo here keeps a warn rule from warning about it forever.
    stage = STAGE_WORDS.get(name, name.split("-p", 1)[0])
    check(
        stage in STAGES,
        key,
        f"must be aligned, {', '.join(STAGES)} or a point key such as finetune-p0.1, got {name!r}",
    )


@dataclass
class RunPoint:
    run: str = field(
        default="",
        metadata={
            "help": "another run's output directory or results.json; relative: to the policy file's folder"
        },
    )
    point: str = field(
        default="finetune",
        metadata={"help": "its point: aligned, base, align, finetune, post or a point key"},
    )

    def __post_init__(self) -> None:
        check(
            bool(self.run.strip()), "run", "is required: the baseline run's output directory or results.json"
        )
        _check_point_name(self.point, "point")


@dataclass
class Rule:
    metric: str = field(default="", metadata={"help": "HS, HS+, FA, over-refusal, IR (or their keys)"})
    tier: Literal["must_pass", "warn"] | None = field(
        default=None, metadata={"help": "must_pass blocks the release; warn is reported only"}
    )
    max: float | None = field(
        default=None, metadata={"help": "absolute ceiling (%) of a lower-is-better metric"}
    )
    min: float | None = field(
        default=None, metadata={"help": "absolute floor (%) of a higher-is-better metric"}
    )
    relative_to: str | RunPoint | None = field(
        default=None,
        metadata={
            "help": "baseline point: aligned, base, finetune, a point key, or {run: PATH, point: ...} of another run"
        },
    )
    max_rise: float | None = field(
        default=None,
        metadata={"help": "points the metric may rise above the baseline (lower-is-better metrics)"},
    )
    max_drop: float | None = field(
        default=None,
        metadata={"help": "points the metric may fall below the baseline (higher-is-better metrics)"},
    )
    bound: Literal["estimate", "interval"] = field(
        default="estimate",
        metadata={"help": "the point estimate, or the unfavourable end of the gated point's 95% interval"},
    )
    stages: list[str] | None = field(
        default=None, metadata={"help": "gate these stages' points instead of each run's final point"}
    )
    points: list[str] | None = field(
        default=None, metadata={"help": "gate these point keys (e.g. post-p0.1)"}
    )
    name: str | None = field(default=None, metadata={"help": "the rule's name in the verdict table"})

    def __post_init__(self) -> None:
        check(bool(self.metric), "metric", f"is required: one of {', '.join(DIRECTED)} (or HS, HS+, FA, ...)")
        key = metric_key(self.metric)
        check(
            key is not None,
            "metric",
            f"must be one of {', '.join(DIRECTED)} or their labels, got {self.metric!r}",
        )
        self.metric = str(key)
        check(self.tier is not None, "tier", "is required: must_pass (blocks the release) or warn")
        lower_better = not METRICS[self.metric].higher_is_better
        label = METRICS[self.metric].label
        if self.relative_to is None:
            for name in ("max_rise", "max_drop"):
                check(
                    getattr(self, name) is None,
                    name,
                    "needs relative_to: the baseline point it is measured from",
                )
            limit, wrong = ("max", "min") if lower_better else ("min", "max")
        else:
            for name in ("max", "min"):
                check(
                    getattr(self, name) is None,
                    name,
                    "is absolute: give it in its own rule, not with relative_to",
                )
            if isinstance(self.relative_to, str):
                _check_point_name(self.relative_to, "relative_to")
            limit, wrong = ("max_rise", "max_drop") if lower_better else ("max_drop", "max_rise")
        better = "lower" if lower_better else "higher"
        check(getattr(self, wrong) is None, wrong, f"does not fit {label} ({better} is better): use {limit}")
        value = getattr(self, limit)
        check(value is not None, limit, f"is required: the rule's limit on {label}")
        check(0 <= value <= 100, limit, f"must be in [0, 100] percentage points, got {value:g}")
        if self.stages is not None:
            check(
                bool(self.stages), "stages", "is empty: name a stage, or leave it out to gate the final point"
            )
            for stage in self.stages:
                check(stage in STAGES, "stages", f"entries must be among {', '.join(STAGES)}, got {stage!r}")
        if self.points is not None:
            check(self.stages is None, "points", "and stages both pick the gated points: give one")
            check(bool(self.points), "points", "is empty: name a point key, or leave it out")
            for point in self.points:
                _check_point_name(point, "points")

    @property
    def direction(self) -> str:
        return "min" if METRICS[self.metric].higher_is_better else "max"

    @property
    def limit(self) -> float:
        return next(v for v in (self.max, self.min, self.max_rise, self.max_drop) if v is not None)

    def baseline_text(self) -> str:
        ref = self.relative_to
        return ref if isinstance(ref, str) else f"{ref.run}:{ref.point}" if ref else ""

    def label(self) -> str:
        if self.name:
            return self.name
        sign = "≤" if self.direction == "max" else "≥"
        text = f"{METRICS[self.metric].label} {sign} "
        if self.relative_to is None:
            text += f"{self.limit:g}"
        else:
            text += f"{self.baseline_text()} {'+' if self.direction == 'max' else '−'} {self.limit:g}"
        return text + (" (95% bound)" if self.bound == "interval" else "")


@dataclass
class Policy:
    rules: list[Rule] = field(default_factory=list, metadata={"help": "the release rules, checked in order"})
    description: str | None = field(default=None, metadata={"help": "what the policy is for"})

    def __post_init__(self) -> None:
        check(bool(self.rules), "rules", "is empty: a policy needs at least one rule")


@dataclass
class LoadedPolicy:
    policy: Policy
    path: Path
    sha256: str  # of the file's bytes as read, so the record names exactly what was checked


def load_policy(path: str) -> LoadedPolicy:
    """A policy file, or the name of a packaged one (``release``); wrong keys and values fail naming the key."""
    file = Path(path)
    if not file.is_file() and "/" not in path and (POLICIES_DIR / f"{path}.yaml").is_file():
        file = POLICIES_DIR / f"{path}.yaml"
    if not file.is_file():
        packaged = ", ".join(p.stem for p in sorted(POLICIES_DIR.glob("*.yaml")))
        raise FtguardError(f"policy file {path} not found (packaged policies: {packaged})")
    raw = file.read_bytes()
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{file}: not a valid YAML policy ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping with a 'rules:' list, got {type(data).__name__}")
    return LoadedPolicy(from_dict(Policy, data, prefix="policy"), file, hashlib.sha256(raw).hexdigest())


def _find_point(run: RunResults, name: str, gated: Point, where: str) -> Point | str:
    """The point ``name`` names in ``run`` for the gated point: its key, or its stage (the point of the gated one's
    harmful ratio when the stage has several); else why there is none."""
    if name in run.points:
        return run.points[name]
    stage = STAGE_WORDS.get(name, name)
    if name == "aligned" and not run.select(["align"]) and run.select(["base"]):
        stage = "base"  # align: null: the model the fine-tune starts from (a provider's aligned model) is the base
    if stage not in STAGES:
        return f"no point {name!r} in {where}"
    ratio = gated.harmful_ratio
    found = [p for p in run.select([stage]) if None in (p.harmful_ratio, ratio) or p.harmful_ratio == ratio]
    if len(found) == 1:
        return found[0]
    at = "" if ratio is None else f" at harmful ratio {ratio:g}"
    if not found:
        return f"no evaluated {stage} point{at} in {where}"
    return f"several {stage} points{at} in {where} ({', '.join(p.key for p in found)}): name one by its key"


def _value(point: Point, metric: str, bound: str, direction: str) -> float | str:
    value = point.value(metric)
    label = METRICS[metric].label
    if value is None:
        return f"{label} not measured at {point.key}"
    if bound == "estimate":
        return value
    interval = point.intervals.get(metric)
    if interval is None:
        return f"no 95% interval of {label} at {point.key} (bound: interval): re-evaluate the run"
    return interval[1] if direction == "max" else interval[0]


class _Baselines:
    """Other runs' results, read once each; an unreadable one is a reason, not a crash (a warn rule only warns)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cache: dict[Path, RunResults | str] = {}

    def get(self, ref: RunPoint) -> tuple[RunResults | str, str]:
        path = Path(ref.run)
        path = path if path.is_absolute() else self.folder / path
        if path not in self.cache:
            try:
                self.cache[path] = read_results(path)
            except FtguardError as exc:
                self.cache[path] = f"baseline run unreadable: {exc}"
        return self.cache[path], str(path)


def _rows_of_rule(rule: Rule, run: RunResults, baselines: _Baselines) -> list[dict[str, Any]]:
    points: list[Point | str]
    try:
        if rule.points is not None:
            points = [run.points.get(k) or f"no point {k!r} in the gated results" for k in rule.points]
        else:
            points = list(gated_points(run, rule.stages))
    except FtguardError as exc:
        points = [str(exc)]
    rows = []
    for point in points:
        row: dict[str, Any] = {
            "rule": rule.label(),
            "tier": rule.tier,
            "metric": rule.metric,
            "bound": rule.bound,
            "direction": rule.direction,
            "point": point.key if isinstance(point, Point) else None,
            "value": None,
            "limit": None,
            "baseline": None,
        }
        value = _value(point, rule.metric, rule.bound, rule.direction) if isinstance(point, Point) else point
        limit: float | str = rule.limit
        if isinstance(point, Point) and rule.relative_to is not None:
            ref = rule.relative_to
            if isinstance(ref, RunPoint):
                other, where = baselines.get(ref)
                name = ref.point
            else:
                other, where, name = run, "the gated results", ref
            base = other if isinstance(other, str) else _find_point(other, name, point, where)
            base_value = (
                _value(base, rule.metric, "estimate", rule.direction) if isinstance(base, Point) else base
            )
            if isinstance(base_value, str):
                limit = f"baseline: {base_value}"
            else:
                assert isinstance(base, Point)
                row["baseline"] = {
                    "run": None if isinstance(ref, str) else where,
                    "point": base.key,
                    "value": base_value,
                }
                limit = base_value + rule.limit if rule.direction == "max" else base_value - rule.limit
        reasons = [x for x in (value, limit) if isinstance(x, str)]
        row["value"] = None if isinstance(value, str) else value
        row["limit"] = None if isinstance(limit, str) else limit
        if reasons:
            ok, why = False, "; ".join(reasons)
        else:
            assert isinstance(value, float | int) and isinstance(limit, float | int)
            ok = value <= limit if rule.direction == "max" else value >= limit
            why = "" if ok else f"{value:.1f} {'>' if rule.direction == 'max' else '<'} {limit:.1f}"
        row["passed"] = ok
        row["verdict"] = "pass" if ok else "fail" if rule.tier == "must_pass" else "warn"
        row["reason"] = why
        rows.append(row)
    return rows


def evaluate_policy(run: RunResults, loaded: LoadedPolicy) -> tuple[bool, list[dict[str, Any]]]:
    """(passed, one row per rule and gated point). Only must_pass rows and an incomplete run fail the release."""
    baselines = _Baselines(loaded.path.parent)
    rows = [row for rule in loaded.policy.rules for row in _rows_of_rule(rule, run, baselines)]
    return run.complete and all(r["verdict"] != "fail" for r in rows), rows


def verdict_table(rows: list[dict[str, Any]], passed: bool, run: RunResults, loaded: LoadedPolicy) -> str:
    lines = ["| rule | point | tier | value | limit | verdict | reason |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = "–" if r["value"] is None else f"{r['value']:.1f}"
        limit = "–" if r["limit"] is None else f"{'≤' if r['direction'] == 'max' else '≥'} {r['limit']:.1f}"
        if r["baseline"]:
            limit += f" ({r['baseline']['point']} {r['baseline']['value']:.1f})"
        verdict = {"pass": "pass", "fail": "**FAIL**", "warn": "warn"}[r["verdict"]]
        lines.append(
            f"| {r['rule']} | {r['point'] or '–'} | {r['tier']} | {value} | {limit} | {verdict} | {r['reason']} |"
        )
    if not run.complete:
        lines += ["", "**FAIL**: the run is incomplete (results.json has complete: false)."]
    warnings = sum(r["verdict"] == "warn" for r in rows)
    lines += [
        "",
        f"Policy: {loaded.path} (sha256 {loaded.sha256[:16]})",
        f"Release policy: {'PASSED' if passed else 'FAILED'}"
        + (f" ({warnings} warning(s))" if warnings else ""),
    ]
    return "\n".join(lines) + "\n"


def verdict_json(
    rows: list[dict[str, Any]], passed: bool, run: RunResults, loaded: LoadedPolicy
) -> dict[str, Any]:
    return {
        "passed": passed,
        "exit_code": 0 if passed else 1,
        "policy": {"path": str(loaded.path), "sha256": loaded.sha256, **to_dict(loaded.policy)},
        "run": {
            "path": None if run.path is None else str(run.path),
            "name": run.name,
            "config_hash": run.config_hash,
            "complete": run.complete,
        },
        "warnings": sum(r["verdict"] == "warn" for r in rows),
        "rows": rows,
    }


def gate_with_policy(results: str, policy: str, json_out: str | None = None) -> int:
    """The `ftguard gate --policy` command: prints the table, writes the JSON record, returns the exit code."""
    loaded = load_policy(policy)  # a bad policy fails before any results are read
    run = read_results(results)
    passed, rows = evaluate_policy(run, loaded)
    print(verdict_table(rows, passed, run, loaded))
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(verdict_json(rows, passed, run, loaded), indent=2) + "\n", encoding="utf-8")
        print(f"json: {out}")
    return 0 if passed else 1
