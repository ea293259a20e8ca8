"""results.json and results.md of a run, and the environment they were produced in."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from ftguard import distributed
from ftguard.metrics import INTERVAL_NOTE, METRICS, RUN_TABLE, cell
from ftguard.pipeline.outputs import write_json_atomic, write_text_atomic
from ftguard.run_results import parse_results

LIBRARIES = (
    "ftguard",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "safetensors",
    "tokenizers",
)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = "not installed"
    return versions


def git_revision() -> str | None:
    """The commit of the ftguard source tree, when it is a git checkout (editable installs)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def markdown_table(results: dict[str, Any], *, status: bool = True) -> str:
    run = parse_results(results)
    judge = run.judge or "?"
    lines = [
        f"# {run.name or 'run'}",
        "",
        f"Model `{run.model}`, judge `{judge}`, seed {run.seed}, config {run.config_hash}."
        " Scores in percent over the held-out prompts.",
        "",
        "| stage | method | p | " + " | ".join(METRICS[m].column for m in RUN_TABLE) + " |",
        "|---|---|---|" + "---|" * len(RUN_TABLE),
    ]
    for point in run.points.values():
        p = point.harmful_ratio
        cells = [point.key, point.method or "–", "–" if p is None else f"{p:g}"]
        cells += [cell(point.value(m), point.intervals.get(m)) for m in RUN_TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        INTERVAL_NOTE + " Over-refusal: share of benign prompts refused (XSTest safe prompts by default).",
    ]
    agreement = [
        (point, pair) for point in run.points.values() for pair in point.entry.get("judge_agreement", [])
    ]
    if agreement:
        lines += ["", "| stage | judges (HS each) | agreement | Cohen's κ |", "|---|---|---|---|"]
        for point, pair in agreement:
            hs = point.entry.get("judges", {})
            names = " vs ".join(f"{j} {hs[j]['harmful_score']:.1f}" if j in hs else j for j in pair["judges"])
            kappa = "–" if pair["kappa"] is None else f"{pair['kappa']:.2f}"
            lines.append(f"| {point.key} | {names} | {pair['agreement']:.1f} | {kappa} |")
    if judge != "?":
        from ftguard.evaluation.judges.validated import validation_line

        lines += ["", validation_line(judge)]
    if judge in ("minilm", "ftguard-judge"):
        lines += [
            "",
            f"The `{judge}` judge is an offline stand-in, not the papers' beaver-dam-7b: do not compare these HS to the papers'.",
        ]
    if status and not run.complete:
        lines += ["", "**Incomplete run**: some stages have not finished."]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    if not distributed.is_main():  # every rank of a launch holds the same results; one writes them
        return
    write_json_atomic(out_dir / "results.json", results)
    write_text_atomic(out_dir / "results.md", markdown_table(results))
