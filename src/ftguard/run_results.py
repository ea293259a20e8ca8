"""Reading a run's results.json: its evaluation points, typed, and which of them is the model the run ends with.

The pipeline writes results.json (pipeline/results.py); results.md, `ftguard compare`, `ftguard gate` and the
sweep report read it through ``read_results``, so that a point's stage, ratio and rates mean the same to each.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftguard.errors import FtguardError
from ftguard.metrics import METRICS

# The evaluation points of a run (config.EVAL_POINTS), in the order the run makes their models: a later stage's
# point supersedes an earlier one as the run's final point. Reading results needs no run config; a test keeps the
# two equal.
STAGES = ("base", "align", "finetune", "post")


@dataclass(frozen=True)
class Point:
    """One evaluated model: ``finetune-p0.1`` is the fine-tune on the mix with 10% harmful samples."""

    key: str
    stage: str
    method: str | None
    harmful_ratio: float | None
    metrics: Mapping[str, float]  # every rate of ftguard.metrics the point measured
    intervals: Mapping[str, tuple[float, float]]
    counts: Mapping[str, tuple[int, int]]  # (flagged, asked) behind each rate
    judge: str | None
    entry: Mapping[str, Any]  # as written, for what the table leaves out (n_*, judges, judge_agreement, ...)

    def value(self, metric: str) -> float | None:
        return self.metrics.get(metric)


@dataclass(frozen=True)
class RunResults:
    name: str | None
    model: str | None
    seed: int | None
    config_hash: str | None
    judge: str | None  # the main judge's name
    complete: bool
    points: Mapping[str, Point]  # in the order the run evaluated them
    data: Mapping[str, Any] = field(repr=False)  # the whole file
    path: Path | None = None

    def select(self, stages: Iterable[str]) -> list[Point]:
        wanted = set(stages)
        return [p for p in self.points.values() if p.stage in wanted]

    def final_points(self) -> list[Point]:
        """The model the run ends with, per harmful ratio: post if evaluated, else finetune (else align, else base,
        for a run that fine-tunes nothing) — what a provider would serve, and what the papers' tables score.

        A run stopped before the stage its config ships has no final point: a repair cut off after the fine-tune
        had been scored as the repair (a sweep archived mid-run counted SafeLoRA's unrepaired model as SafeLoRA)."""
        tuned = self.select(("finetune", "post"))
        shipped = None if self.complete else self.last_trained_stage()
        if shipped is not None and not any(p.stage == shipped for p in self.points.values()):
            return []
        if tuned:
            last: dict[float | None, Point] = {}
            for p in tuned:
                held = last.get(p.harmful_ratio)
                if held is None or STAGES.index(p.stage) > STAGES.index(held.stage):
                    last[p.harmful_ratio] = p
            keys = {p.key for p in last.values()}
            return [p for p in tuned if p.key in keys]
        for stage in ("align", "base"):
            if found := self.select((stage,)):
                return found
        return []

    def final_keys(self) -> set[str]:
        return {p.key for p in self.final_points()}

    def last_trained_stage(self) -> str | None:
        """The stage of the model the run's config ships (post when it has a repair), None without a config."""
        config = self.data.get("config")
        if not isinstance(config, Mapping):
            return None
        return next((s for s in ("post", "finetune", "align") if config.get(s)), "base")


def read_results(path: str | Path) -> RunResults:
    """A run directory or its results.json; a missing or malformed file raises FtguardError saying what to do."""
    given = Path(path)
    file = given if given.is_file() else given / "results.json"
    if not file.is_file():
        raise FtguardError(
            f"{file} not found: give a run's output directory (holding results.json) or the file"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FtguardError(
            f"{file}: not readable JSON ({exc}); delete it and `ftguard run` the run's config.yaml again: finished "
            "stages and evaluations are skipped and results.json is rewritten"
        ) from None
    return parse_results(data, file)


def parse_results(data: Any, path: Path | None = None) -> RunResults:
    """The typed view of a results.json already loaded (the pipeline renders results.md from its own dict)."""
    where = str(path) if path else "results.json"
    if not isinstance(data, Mapping) or not isinstance(data.get("stages", {}), Mapping):
        raise FtguardError(
            f"{where}: not an ftguard results.json (no 'stages' mapping); give a run's results.json"
        )
    judge = data.get("judge")
    points = {str(key): _point(str(key), entry, where) for key, entry in data.get("stages", {}).items()}
    return RunResults(
        name=data.get("name"),
        model=data.get("model"),
        seed=data.get("seed"),
        config_hash=data.get("config_hash"),
        judge=judge.get("name") if isinstance(judge, Mapping) else judge,
        complete=bool(data.get("complete")),
        points=points,
        data=data,
        path=path,
    )


def _point(key: str, entry: Any, where: str) -> Point:
    if not isinstance(entry, Mapping):
        raise FtguardError(f"{where}: stages.{key} must be a mapping of metrics, got {entry!r}")
    metrics = {}
    for name in METRICS:
        value = entry.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FtguardError(f"{where}: stages.{key}.{name} must be a number, got {value!r}")
        metrics[name] = value
    intervals = {m: (v[0], v[1]) for m, v in (entry.get("intervals") or {}).items() if _pair(v)}
    counts = {m: (v[0], v[1]) for m, v in (entry.get("counts") or {}).items() if _pair(v)}
    ratio = entry.get("harmful_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
        raise FtguardError(f"{where}: stages.{key}.harmful_ratio must be a number or null, got {ratio!r}")
    return Point(
        key=key,
        # Written since the first release; a hand-made file without it is named like finetune-p0.1
        stage=entry.get("stage") or key.split("-p", 1)[0],
        method=entry.get("method"),
        harmful_ratio=None if ratio is None else float(ratio),
        metrics=metrics,
        intervals=intervals,
        counts=counts,
        judge=entry.get("judge"),
        entry=entry,
    )


def _pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and None not in value


def generations_file(run_dir: Path, point: Point) -> Path | None:
    """A point's generations.jsonl (every prompt, answer and verdict): where results.json says (a sweep's units
    store, or inside the run folder: a relative path is the run folder's), else the run folder's eval/<point>/;
    None when neither exists (an archived run, a units store on another machine)."""
    recorded = point.entry.get("generations")
    candidates = [run_dir / recorded] if recorded else []
    for file in [*candidates, run_dir / "eval" / point.key / "generations.jsonl"]:
        if file.is_file():
            return file
    return None
