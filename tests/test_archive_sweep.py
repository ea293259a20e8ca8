"""scripts/archive_sweep.py: a rescored copy from a machine that holds fewer answers never replaces the fuller
archive, but the runs that archive lacks are kept beside it."""

from __future__ import annotations

import json

import pytest

from script_module import load_script


def rescored_copy(folder, runs, missing=()):
    """A hand-made `ftguard judge rescore` output: runs.json rows and rescore.json points for ``runs``."""
    folder.mkdir(parents=True)
    rows = [{"run": r, "defense": r.split("/")[0], "complete": True} for r in runs]
    points = [{"run": f"runs/{r}", "point": "finetune", "n": 200, "agreement": 100.0} for r in runs]
    points += [{"run": f"runs/{r}", "point": "finetune", "missing": True} for r in missing]
    (folder / "runs.json").write_text(json.dumps(rows))
    (folder / "rescore.json").write_text(json.dumps({"judge": {"name": "keyword"}, "points": points}))
    (folder / "report.md").write_text(f"{len(runs)} runs\n")
    return folder


def test_a_thinner_copy_keeps_the_archive_and_adds_only_the_runs_it_lacks(tmp_path):
    archive_sweep = load_script("archive_sweep")
    dest = tmp_path / "archive"
    archive_sweep.archive(rescored_copy(tmp_path / "old", ["sft/seed46", "sft/seed47", "lisa/seed46"]), dest)
    assert archive_sweep.scored_points(dest) == 3

    # a later machine holds Booster's answers and one of SFT's, not the rest
    later = rescored_copy(tmp_path / "later", ["sft/seed46", "booster/seed46"], missing=["lisa/seed46"])
    with pytest.raises(SystemExit, match=r"kept the archive .* the 1 runs it lacks are in .*added"):
        archive_sweep.archive(later, dest)
    assert (dest / "report.md").read_text() == "3 runs\n"
    added = json.loads((dest / "added" / "runs.json").read_text())
    assert [r["run"] for r in added] == ["booster/seed46"]
    assert [p["run"] for p in json.loads((dest / "added" / "rescore.json").read_text())["points"]] == [
        "runs/booster/seed46"
    ]

    # a still thinner copy (Booster's answers gone too) keeps the added runs as they were
    gone = rescored_copy(tmp_path / "gone", [], missing=["booster/seed46"])
    with pytest.raises(SystemExit, match="kept the archive"):
        archive_sweep.archive(gone, dest)
    assert [r["run"] for r in json.loads((dest / "added" / "runs.json").read_text())] == ["booster/seed46"]
