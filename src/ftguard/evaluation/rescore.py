"""Re-judge stored answers: a run's or a sweep's HS under another judge, without generating them again.

Generating is most of an evaluation's cost; the verdicts are not. Every evaluation point keeps its answers
(generations.jsonl), so a second judge — a guard model on a GPU, a re-fitted head, a stricter threshold — can
score the same answers, and the paired machinery compares defenses under it exactly as under the first one.

The rescored copy mirrors the source's layout (``runs/<defense>/<seed>/results.json`` for a sweep), with the
harm metrics (HS, HS+, HS asked through an attack's trigger) and their per-prompt outcomes replaced; FA is
copied as it was, and so are over-refusal and instruction refusal unless a refusal detector reads them again. Each point says what it was rescored from
(``rescored``: the first judge, its HS, and the two judges' agreement and Cohen's kappa on these answers).
A point whose answers cannot be found is left out and named (``rescored_missing``); a run missing the point it
ships is marked incomplete, so that no table counts it as finished.

Where answers are found: the path results.json records (runs made since 2026-12-05), the run folder's
``eval/<point>/``, or — for older sweep runs, which did not record it — any eval unit of the given units stores
whose stored per-prompt outcomes equal the point's (an evaluation's outcomes over hundreds of prompts identify
it; the answers' own verdicts are checked against them before use).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftguard.errors import FtguardError
from ftguard.evaluation.judges import Judge, Verdict
from ftguard.evaluation.paired import decode_entry, encode_outcomes, items_digest
from ftguard.evaluation.refusal_detector import RefusalDetector
from ftguard.evaluation.scorers import is_degenerate_or_unreadable
from ftguard.evaluation.stats import cohen_kappa, rate
from ftguard.run_results import Point, generations_file, read_results

# The refusal rates a refusal detector decides, by the kind of answer generations.jsonl stores for them.
REFUSAL_KINDS = {"benign": "over_refusal", "instruction": "instruction_refusal"}


class AnswerStores:
    """Eval units of one or more units stores, found by the per-prompt outcomes they recorded."""

    def __init__(self, folders: Iterable[Path] = ()) -> None:
        self._folders = [Path(f) for f in folders]
        self._index: dict[str, list[Path]] | None = None

    def find(self, point: Point) -> Path | None:
        outcomes = point.entry.get("outcomes")
        if not outcomes or not self._folders:
            return None
        if self._index is None:
            self._index = {}
            for folder in self._folders:
                for done in sorted((folder / "eval").glob("*/COMPLETE.json")):
                    recorded = json.loads(done.read_text(encoding="utf-8")).get("metrics", {}).get("outcomes")
                    answers = done.parent / "generations.jsonl"
                    if recorded and answers.is_file():
                        self._index.setdefault(_signature(recorded), []).append(answers)
        found = self._index.get(_signature(outcomes), [])
        return found[0] if found else None


class RememberingJudge(Judge):
    """A judge that judges the same answers to the same prompts only once."""

    def __init__(self, judge: Judge) -> None:
        self.inner, self.name = judge, judge.name
        self._seen: dict[str, list[Verdict]] = {}

    def verdicts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        key = hashlib.sha256(json.dumps([list(prompts), list(responses)]).encode()).hexdigest()
        if key not in self._seen:
            self._seen[key] = self.inner.verdicts(prompts, responses)
        return self._seen[key]

    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        raise NotImplementedError  # verdicts() above is the only way in

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


class RememberingDetector:
    """A refusal detector that reads the same answers to the same prompts only once."""

    def __init__(self, detector: RefusalDetector) -> None:
        self.inner = detector
        self._seen: dict[str, list[bool]] = {}

    def detect(self, prompts: list[str], responses: list[str]) -> list[bool]:
        key = hashlib.sha256(json.dumps([prompts, responses]).encode()).hexdigest()
        if key not in self._seen:
            self._seen[key] = self.inner.detect(prompts, responses)
        return self._seen[key]

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def _signature(outcomes: dict[str, Any]) -> str:
    return json.dumps(outcomes, sort_keys=True)


@dataclass
class PointRescore:
    key: str
    n: int
    before: float
    after: float
    agreement: float
    kappa: float | None
    over_refusal: tuple[float | None, float | None] | None = None  # (before, after) when detected again


@dataclass
class RunRescore:
    source: Path
    out: Path
    points: list[PointRescore] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    complete: bool = True
    judge_before: str | None = None


def answers_of(run_dir: Path, point: Point, stores: AnswerStores) -> Path | None:
    return generations_file(run_dir, point) or stores.find(point)


def read_answers(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FtguardError(f"{path}: not a readable generations.jsonl ({exc})") from None


def _set_rate(entry: dict[str, Any], metric: str, values: list[bool], items: str) -> None:
    r = rate(sum(values), len(values))
    entry[metric], entry["intervals"][metric], entry["counts"][metric] = (
        r["value"],
        r["ci95"],
        [r["k"], r["n"]],
    )
    entry["outcomes"][metric] = {"items": items, "bits": encode_outcomes(values)}


def _set_degenerate_rates(entry: dict[str, Any], degenerate: list[bool], benign_answers: list[str]) -> None:
    """The degenerate rates under the widened rule (no per-item outcomes: the pipeline keeps none for them)."""
    widened = {"degenerate_rate": degenerate}
    if "benign_degenerate_rate" in entry and benign_answers:
        widened["benign_degenerate_rate"] = list(map(is_degenerate_or_unreadable, benign_answers))
    for metric, values in widened.items():
        r = rate(sum(values), len(values))
        entry[metric], entry["intervals"][metric], entry["counts"][metric] = (
            r["value"],
            r["ci95"],
            [r["k"], r["n"]],
        )


def rescore_point(
    entry: dict[str, Any],
    rows: list[dict[str, Any]],
    judge: Judge,
    where: str,
    detector: RefusalDetector | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], PointRescore]:
    """(the point's entry under ``judge``, its answers with the new verdicts, the summary); with ``detector``,
    over-refusal and instruction refusal are detected again too."""
    harmful = [r for r in rows if r.get("kind") == "harmful"]
    if not harmful:
        raise FtguardError(f"{where}: no answers to harmful prompts in its generations.jsonl")
    recorded = (entry.get("outcomes") or {}).get("harmful_score")
    old = [bool(r["flagged"]) for r in harmful]
    if recorded is not None and (
        recorded["items"] != items_digest([r["source"] for r in harmful])
        or [bool(v) for v in decode_entry(recorded)] != old
    ):
        raise FtguardError(
            f"{where}: the answers found are not this point's (their prompts or verdicts differ from the "
            "outcomes in results.json); pass the right units store with --units-dir"
        )
    prompts = [r["prompt"] for r in harmful]
    verdicts = judge.verdicts(prompts, [r["answer"] for r in harmful])
    flags = [v.harmful for v in verdicts]
    # a judge that reads more answers as degenerate (unreadable ones) widens the stored rule, never narrows it
    degenerate = [bool(r.get("degenerate")) or v.degenerate for r, v in zip(harmful, verdicts, strict=True)]
    plus = [f or d for f, d in zip(flags, degenerate, strict=True)]
    items = items_digest([r["source"] for r in harmful])
    n = len(flags)
    judged = {"harmful_score": flags, "harmful_score_plus": plus}
    # asked through the attack's trigger: judged against the plain prompt, as the pipeline does
    triggered = [r for r in rows if r.get("kind") == "harmful_triggered"]
    if triggered:
        plain = {r["source"]: r["prompt"] for r in harmful}
        judged["harmful_score_triggered"] = judge.judge(
            [plain[r["source"]] for r in triggered], [r["answer"] for r in triggered]
        )
    new = {k: v for k, v in entry.items() if k not in ("judges", "judge_agreement")}
    new["intervals"], new["counts"] = dict(entry.get("intervals") or {}), dict(entry.get("counts") or {})
    new["outcomes"] = dict(entry.get("outcomes") or {})
    for metric, values in judged.items():
        _set_rate(new, metric, values, items)
    new["n_flagged"] = int(sum(flags))
    if judge.describe().get("unreadable_as_degenerate"):
        _set_degenerate_rates(new, degenerate, [r["answer"] for r in rows if r.get("kind") == "benign"])
    new["judge"] = judge.name
    before = 100.0 * sum(old) / n
    summary = PointRescore(
        key="",
        n=n,
        before=before,
        after=100.0 * sum(flags) / n,
        agreement=100.0 * sum(a == b for a, b in zip(old, flags, strict=True)) / n,
        kappa=cohen_kappa(old, flags),
    )
    new["rescored"] = {
        "from_judge": entry.get("judge"),
        "harmful_score_before": before,
        "agreement": summary.agreement,
        "kappa": summary.kappa,
    }
    refused: dict[int, bool] = {}  # by row position: the detector's new verdict
    if detector is not None:
        new["refusal_detector"] = detector.describe()
        new["rescored"]["from_refusal_detector"] = (entry.get("refusal_detector") or {}).get("name")
        for kind, metric in REFUSAL_KINDS.items():
            asked = [i for i, r in enumerate(rows) if r.get("kind") == kind]
            if not asked:
                continue
            found = detector.detect([rows[i]["prompt"] for i in asked], [rows[i]["answer"] for i in asked])
            new["rescored"][f"{metric}_before"] = entry.get(metric)
            _set_rate(new, metric, found, items_digest([rows[i]["source"] for i in asked]))
            refused |= dict(zip(asked, found, strict=True))
        summary.over_refusal = (entry.get("over_refusal"), new.get("over_refusal"))
    answers = []
    for row, verdict in zip(harmful, verdicts, strict=True):
        answers.append(
            row
            | {"flagged": verdict.harmful, "score": verdict.score, "category": verdict.category}
            | {
                "flagged_before": row["flagged"],
                "degenerate": bool(row.get("degenerate")) or verdict.degenerate,
            }
        )
    by_source = dict(
        zip((r["source"] for r in triggered), judged.get("harmful_score_triggered", []), strict=True)
    )
    answers += [
        r | {"flagged": by_source[r["source"]], "flagged_before": r.get("flagged")} for r in triggered
    ]
    answers += [
        r | ({"refused": refused[i], "refused_before": r.get("refused")} if i in refused else {})
        for i, r in enumerate(rows)
        if r.get("kind") not in ("harmful", "harmful_triggered")
    ]
    return new, answers, summary


def rescore_run(
    run_dir: Path,
    out_dir: Path,
    judge: Judge,
    stores: AnswerStores,
    versions: dict[str, str] | None = None,
    detector: RefusalDetector | None = None,
) -> RunRescore:
    """Write ``run_dir``'s results rescored by ``judge`` (and ``detector``, if given) into ``out_dir``
    (results.json, eval/<point>/).

    ``versions``: the judge's ``judge_versions`` entry (its fitted weights' hash), recorded as a run records it."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if run_dir.resolve() == out_dir.resolve():
        raise FtguardError(f"{out_dir}: write the rescored copy elsewhere than the run it rescores")
    results = read_results(run_dir)
    report = RunRescore(run_dir, out_dir, judge_before=results.judge)
    stages: dict[str, Any] = {}
    answers_out: dict[str, list[dict[str, Any]]] = {}
    for key, point in results.points.items():
        found = answers_of(run_dir, point, stores)
        if found is None:
            report.missing.append(key)
            continue
        entry, answers, summary = rescore_point(
            dict(point.entry), read_answers(found), judge, f"{run_dir} {key}", detector
        )
        entry["generations"] = f"eval/{key}/generations.jsonl"
        summary.key = key
        stages[key], answers_out[key] = entry, answers
        report.points.append(summary)
    shipped = {p.key for p in results.final_points()}
    report.complete = results.complete and not (shipped & set(report.missing))
    data = dict(results.data)
    data |= {
        "stages": stages,
        "complete": report.complete,
        "judge": judge.describe(),
        "judge_versions": dict(versions or {}),
        "extra_judges": [],
        "rescored_from": {
            "run": str(run_dir),
            "judge": results.judge,
            "judge_versions": results.data.get("judge_versions", {}),
        },
        "rescored_missing": report.missing,
    }
    shutil.rmtree(out_dir / "eval", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, answers in answers_out.items():
        folder = out_dir / "eval" / key
        folder.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row) + "\n" for row in answers)
        (folder / "generations.jsonl").write_text(text, encoding="utf-8")
    if (run_dir / "config.yaml").is_file():
        shutil.copyfile(run_dir / "config.yaml", out_dir / "config.yaml")
    # written last: a copy stopped half-way has no results.json, and no report reads it as a run
    (out_dir / "results.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return report


def run_folders(source: Path) -> list[Path]:
    """``source`` itself when it is a run folder, else every run folder under its ``runs/`` (a sweep's output or
    archive)."""
    if (source / "results.json").is_file():
        return [source]
    found = sorted(p.parent for p in (source / "runs").glob("**/results.json"))
    if not found:
        raise FtguardError(
            f"{source}: neither a run folder (results.json) nor a sweep's folder (runs/*/results.json)"
        )
    return found


def rescore(
    source: Path,
    out: Path,
    judge: Judge,
    units_dirs: Sequence[Path] = (),
    versions: dict[str, str] | None = None,
    detector: RefusalDetector | None = None,
    progress: bool = True,
) -> list[RunRescore]:
    """Rescore a run folder, or every run of a sweep folder into the same layout under ``out``."""
    from tqdm.auto import tqdm

    source, out = Path(source), Path(out)
    if not source.exists():
        raise FtguardError(f"{source} not found: give a run's or a sweep's output folder")
    folders = run_folders(source)
    stores = AnswerStores([*units_dirs, *([source / "units"] if (source / "units").is_dir() else [])])
    # a sweep's runs share their aligned model's answers: judged once
    judge = RememberingJudge(judge)
    detector = RememberingDetector(detector) if detector is not None else None
    reports = []
    for folder in tqdm(folders, desc=f"rescoring with {judge.name}", unit="run", disable=not progress):
        target = out if folder == source else out / folder.relative_to(source)
        reports.append(rescore_run(folder, target, judge, stores, versions, detector))
    return reports


def summary_rows(reports: list[RunRescore], source: Path) -> list[dict[str, Any]]:
    rows = []
    for report in reports:
        run = "." if report.source == source else str(report.source.relative_to(source))
        for p in report.points:
            row = {"run": run, "point": p.key, "n": p.n, "hs_before": p.before, "hs_after": p.after}
            row |= {"agreement": p.agreement, "kappa": p.kappa}
            if p.over_refusal is not None:
                row |= {"or_before": p.over_refusal[0], "or_after": p.over_refusal[1]}
            rows.append(row)
        rows += [{"run": run, "point": key, "missing": True} for key in report.missing]
    return rows


def summary_markdown(rows: list[dict[str, Any]], judge: str, before: str, detector: str | None = None) -> str:
    refusal = detector is not None
    kept = "FA is" if refusal else "FA and over-refusal are"
    lines = [
        f"# Rescored by `{judge}` (from `{before}`)" + (f", over-refusal by `{detector}`" if refusal else ""),
        "",
        f"The same answers, judged again; {kept} as they were.",
        "",
        f"| run | point | prompts | HS, {before} | HS, {judge} | agreement % | kappa |"
        + (" OR before | OR after |" if refusal else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if refusal else ""),
    ]
    for r in rows:
        if r.get("missing"):
            lines.append(
                f"| {r['run']} | {r['point']} | answers not found | | | | |" + (" | |" if refusal else "")
            )
            continue
        kappa = "–" if r["kappa"] is None else f"{r['kappa']:.2f}"
        line = (
            f"| {r['run']} | {r['point']} | {r['n']} | {r['hs_before']:.1f} | {r['hs_after']:.1f} "
            f"| {r['agreement']:.1f} | {kappa} |"
        )
        if refusal:
            line += "".join(f" {_pct(r.get(k))} |" for k in ("or_before", "or_after"))
        lines.append(line)
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def plot_summary(rows: list[dict[str, Any]], judge: str, before: str, path: Path) -> Path | None:
    scored = [r for r in rows if not r.get("missing")]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter([r["hs_before"] for r in scored], [r["hs_after"] for r in scored], s=14, alpha=0.7)
    ax.plot([0, 100], [0, 100], color="grey", lw=0.8, ls="--")
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel=f"HS, {before} (%)", ylabel=f"HS, {judge} (%)")
    ax.set_title("each evaluated model, the same answers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
