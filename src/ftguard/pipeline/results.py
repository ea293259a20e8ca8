"""results.json and results.md of a run, and the environment they were produced in."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from ftguard import distributed
from ftguard.pipeline.outputs import write_json_atomic, write_text_atomic

METRIC_COLUMNS = (
    ("harmful_score", "HS ↓"),
    ("harmful_score_plus", "HS+ ↓"),
    ("finetune_accuracy", "FA ↑"),
    ("over_refusal", "over-refusal ↓"),
    ("degenerate_rate", "degenerate"),
)
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


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def metric_cell(entry: dict[str, Any], metric: str) -> str:
    """``76.6 (65.0–85.2)``: the rate and its 95% Wilson interval, when the entry has one."""
    value = entry.get(metric)
    interval = (entry.get("intervals") or {}).get(metric)
    if value is None or interval is None:
        return _fmt(value)
    return f"{value:.1f} ({interval[0]:.1f}–{interval[1]:.1f})"


INTERVAL_NOTE = "In parentheses: 95% Wilson intervals over the prompts."


def markdown_table(results: dict[str, Any], *, status: bool = True) -> str:
    judge = (results.get("judge") or {}).get("name", "?")
    lines = [
        f"# {results.get('name', 'run')}",
        "",
        f"Model `{results.get('model')}`, judge `{judge}`, seed {results.get('seed')}, config {results.get('config_hash')}."
        " Scores in percent over the held-out prompts.",
        "",
        "| stage | method | p | " + " | ".join(label for _, label in METRIC_COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(METRIC_COLUMNS),
    ]
    for key, entry in results.get("stages", {}).items():
        p = entry.get("harmful_ratio")
        cells = [key, entry.get("method") or "–", "–" if p is None else f"{p:g}"]
        cells += [metric_cell(entry, metric) for metric, _ in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        INTERVAL_NOTE + " Over-refusal: share of benign prompts refused (XSTest safe prompts by default).",
    ]
    agreement = [
        (key, entry, pair)
        for key, entry in results.get("stages", {}).items()
        for pair in entry.get("judge_agreement", [])
    ]
    if agreement:
        lines += ["", "| stage | judges (HS each) | agreement | Cohen's κ |", "|---|---|---|---|"]
        for key, entry, pair in agreement:
            hs = entry.get("judges", {})
            names = " vs ".join(f"{j} {hs[j]['harmful_score']:.1f}" if j in hs else j for j in pair["judges"])
            kappa = "–" if pair["kappa"] is None else f"{pair['kappa']:.2f}"
            lines.append(f"| {key} | {names} | {pair['agreement']:.1f} | {kappa} |")
    if judge != "?":
        from ftguard.evaluation.judges.validated import validation_line

        lines += ["", validation_line(judge)]
    if judge in ("minilm", "ftguard-judge"):
        lines += [
            "",
            f"The `{judge}` judge is an offline stand-in, not the papers' beaver-dam-7b: do not compare these HS to the papers'.",
        ]
    if status and not results.get("complete"):
        lines += ["", "**Incomplete run**: some stages have not finished."]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    if not distributed.is_main():  # every rank of a launch holds the same results; one writes them
        return
    write_json_atomic(out_dir / "results.json", results)
    write_text_atomic(out_dir / "results.md", markdown_table(results))
