"""Copy a sweep's finished runs, without weights, into a folder that can be committed beside a results table.

    python scripts/archive_sweep.py runs/sweeps/cpu-smollm2 docs/results/cpu-smollm2

Each complete run keeps its config.yaml, results.json and results.md (a few KB: metrics, intervals, counts, the
judge, versions and git revision; no generations, no weights), plus the sweep's own files (sweep.yaml,
sweep.json, report.*, runs.*, plots). It is the raw record behind the results pages (docs/RESULTS*.md), and it resumes a sweep on
another machine: copy it back (`cp -rn docs/results/cpu-smollm2/. runs/sweeps/cpu-smollm2/`) and the runs it holds
are skipped as complete (their configs are compared, less the output folder), so only the missing runs train.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ftguard.sweep.plots import PLOT_FILES

RUN_FILES = ("config.yaml", "results.json", "results.md")
# rescore.*: a copy judged again by `ftguard judge rescore` (per model: HS under both judges, no text)
SWEEP_FILES = (
    "sweep.yaml",
    "sweep.json",
    "report.md",
    "report.json",
    "runs.csv",
    "runs.json",
    "rescore.json",
    "rescore.md",
)
PLOTS = (*PLOT_FILES, "rescore.png")
ADDED = "added"  # a rescored archive's runs from a later machine (archive_added)


def archive(src: Path, dest: Path) -> int:
    """Copy ``src``'s complete runs and its sweep-level files into ``dest``; the number of runs copied.

    A rescored copy (`ftguard judge rescore`) keeps its sweep-level files only: its runs repeat another archive's
    with other verdicts, and are made again from that archive and the answers in a minute — where the units
    store holding the answers survives. A copy that scored fewer points than the one archived is refused."""
    copied = 0
    rescored = (src / "rescore.json").is_file()
    new, kept = scored_points(src), scored_points(dest)
    if rescored and new < kept:
        # the answers of older runs live in a units store, outside the repository: on a machine that lost it a
        # rescore finds fewer of them, and must not replace the fuller table already archived
        added = archive_added(src, dest)
        raise SystemExit(
            f"{src} scored {new} points, the archived {dest} {kept}: kept the archive "
            "(the older runs' answers are not in the units store given)"
            + (f"; the {added} runs it lacks are in {dest / ADDED}" if added else "")
        )
    for results in [] if rescored else sorted(src.glob("runs/*/*/results.json")):
        if not json.loads(results.read_text()).get("complete"):
            continue
        target = dest / results.parent.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            if (results.parent / name).is_file():
                shutil.copy2(results.parent / name, target / name)
        copied += 1
    dest.mkdir(parents=True, exist_ok=True)
    for name in (*SWEEP_FILES, *PLOTS):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    return copied


def archive_added(src: Path, dest: Path) -> int:
    """Keep, in ``dest/added/``, the runs of a thinner rescored copy that the archived copy lacks (their rows of
    runs.json and points of rescore.json); the number of such runs.

    The archived copy's report pairs defenses prompt by prompt, which needs every run's answers in one units store;
    runs made on a later machine cannot join it, but their per-run HS under each judge can still be read beside
    the archived runs' at the same seeds (scripts/make_testbed_md.py). A thinner ``added/`` does not replace a
    fuller one, for the reason above."""
    archived = {r["run"] for r in _rows(dest / "runs.json")}
    rows = [r for r in _rows(src / "runs.json") if r["run"] not in archived and r.get("complete")]
    runs = {r["run"] for r in rows}
    summary = json.loads((src / "rescore.json").read_text())
    # rescore.json names a run by its folder under the sweep (runs/<defense>/<seed>), runs.json without runs/
    points = [
        p
        for p in summary["points"]
        if p.get("run", "").removeprefix("runs/") in runs and not p.get("missing")
    ]
    if not points or len(points) < scored_points(dest / ADDED):
        return 0
    (dest / ADDED).mkdir(parents=True, exist_ok=True)
    (dest / ADDED / "runs.json").write_text(json.dumps(rows, indent=1) + "\n")
    (dest / ADDED / "rescore.json").write_text(json.dumps(summary | {"points": points}, indent=1) + "\n")
    return len(runs)


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def scored_points(folder: Path) -> int:
    """How many evaluation points a rescored copy judged (0 if it holds none)."""
    summary = folder / "rescore.json"
    if not summary.is_file():
        return 0
    return sum(1 for p in json.loads(summary.read_text())["points"] if not p.get("missing"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/archive_sweep.py SWEEP_OUTPUT_DIR DEST")
    src, dest = Path(sys.argv[1]), Path(sys.argv[2])
    if not any((src / name).is_file() for name in ("sweep.json", "rescore.json")):
        sys.exit(
            f"{src} holds no sweep.json: give the --output-dir of `ftguard sweep` or `ftguard judge rescore`"
        )
    copied = archive(src, dest)
    if (src / "rescore.json").is_file():
        print(f"the rescored copy's summary files copied to {dest}")
    else:
        print(f"{copied} complete runs copied to {dest}")
