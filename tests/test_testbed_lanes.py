"""scripts/testbed_lanes.sh with a stand-in for `ftguard sweep` that only records its calls: the order of each
lane's sweeps, a lane helping with the other's once its own are done, and a failed sweep holding its lane."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "testbed_lanes.sh"


def _items(lane: str) -> list[str]:
    body = re.search(rf"^{lane}=\((.*?)\)", SCRIPT.read_text(), re.S | re.M)
    assert body, f"{lane} not found in {SCRIPT}"
    return body.group(1).split()


def _run(tmp_path: Path, fail: str = "") -> Path:
    fake = tmp_path / "ftguard"
    # one line per call: the sweep and the arguments that matter here
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$*" >> "$CALLS"\n'
        f'[[ "$2" == "sweeps/{fail}" && -n "{fail}" ]] && exit 1\n'
        "exit 0\n"
    )
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    env = {
        **os.environ,
        "FTGUARD": str(fake),
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "UNITS": str(tmp_path / "units"),
        "CALLS": str(calls),
    }
    subprocess.run(["bash", str(SCRIPT), "run", "1"], env=env, check=True, capture_output=True, timeout=120)
    return tmp_path / "out"


def _lane_calls(out: Path, lane: str) -> list[str]:
    """The sweeps LANE ran (each writes its own log in the sweep's output folder), sorted."""
    return sorted(p.parent.name for p in out.glob(f"*/lane-{lane}.log"))


def _sweep(item: str) -> str:
    return re.split("[:@]", item)[0]


def test_each_lane_runs_its_own_items_then_helps_with_the_others_cooperatively(tmp_path):
    out = _run(tmp_path)
    lane_a, lane_b = _items("LANE_A"), _items("LANE_B")
    every = sorted({_sweep(i) for i in lane_a + lane_b})
    # both lanes reached every sweep: each helped with the other's once its own were done
    assert _lane_calls(out, "A") == every
    assert _lane_calls(out, "B") == every
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 * (len(lane_a) + len(lane_b))
    # every call is cooperative: a lane skips the runs the other lane is making instead of waiting on them
    assert all("--shard 0/1" in c for c in calls), calls
    # a lane item with defenses after the colon runs those only, one with seeds after the at-sign those only
    for item in lane_a + lane_b:
        spec, _, seeds = item.partition("@")
        sweep, _, defenses = spec.partition(":")
        wanted = (
            [f"sweeps/{sweep} "]
            + [f"--defenses {defenses} "] * bool(defenses)
            + [f"--seeds {seeds} "] * bool(seeds)
        )
        assert any(all(w in c + " " for w in wanted) for c in calls), (item, calls)
        if not seeds:
            assert any(f"sweeps/{sweep} " in c + " " and "--seeds" not in c for c in calls), item


def test_a_failed_sweep_holds_its_lane_s_later_items(tmp_path):
    lane_a, lane_b = _items("LANE_A"), _items("LANE_B")
    failing = _sweep(lane_b[0])
    if failing in {_sweep(i) for i in lane_a}:
        pytest.skip("the lanes share their first sweep; this test needs lane B's own")
    out = _run(tmp_path, fail=failing)
    # lane B stops at its first item; lane A, done with its own, reaches it too and stops there as well
    assert _lane_calls(out, "B") == [failing]
    assert _lane_calls(out, "A") == sorted({_sweep(i) for i in lane_a} | {failing})


def test_each_sweep_reuses_the_other_lane_sweeps_finished_runs(tmp_path):
    out = _run(tmp_path)
    calls = (tmp_path / "calls").read_text().splitlines()
    suite = next(c for c in calls if c.split()[1] == "sweeps/cpu-attack-suite")
    # the study's archive is in the repository (docs/results), and the lanes copied it into OUT
    assert f"--reuse {out}/testbed-study " in suite + " " and "--reuse docs/results/testbed-study" in suite
    assert "--reuse docs/results/cpu-attack-suite " not in suite + " "  # never itself
    # the Virus probe run ahead of the suite under the same configs
    assert "--reuse docs/results/cpu-attack-suite-virus-probe" in suite
    study = next(c for c in calls if c.split()[1].startswith("sweeps/testbed-study"))
    assert "-probe" not in study
