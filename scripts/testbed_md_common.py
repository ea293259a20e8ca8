"""What the testbed's RESULTS page (scripts/make_testbed_md.py) and its attack-suite section
(scripts/testbed_md_suite.py) share: the sweeps' names and how a sweep's report is read."""

from __future__ import annotations

import json
from pathlib import Path

SWEEPS = {
    "attack": "testbed-attack-calibration",
    "calibration": "testbed-defense-calibration",
    "align_calibration": "testbed-align-calibration",
    "study": "testbed-study",
    "strong": "testbed-study-strong",
    "uncalibrated": "testbed-study-uncalibrated",
    "attack_suite": "cpu-attack-suite",
    # the suite's SFT and filter cells under Virus at one seed, run ahead of the suite (same configs)
    "virus_probe": "cpu-attack-suite-virus-probe",
    # item 7: the same protocol on a second, base model
    "gemma": "testbed-gemma3-defenses",
}


def read_report(folder: Path | None) -> tuple[str, dict] | None:
    if folder is None or not (folder / "report.md").is_file():
        return None
    return (folder / "report.md").read_text(), json.loads((folder / "report.json").read_text())


def section(markdown: str, heading: str) -> str:
    """The text of ``## heading…`` up to the next level-2 heading (without the trailing incomplete note)."""
    parts = markdown.split("\n## ")
    for part in parts[1:]:
        if part.startswith(heading):
            body = "## " + part
            return body.split("\n**Incomplete:", 1)[0].rstrip() + "\n"
    return ""


def status(report: dict) -> str:
    done, total = report["complete_runs"], report["runs"]
    return f"{done} of {total} runs finished" + (
        "" if done == total else " (**incomplete**: numbers may move)"
    )
