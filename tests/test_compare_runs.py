"""scripts/compare_runs.py: any two defenses of a sweep paired over their common seeds and prompts."""

from __future__ import annotations

import json

import pytest

from ftguard.evaluation.paired import encode_outcomes
from script_module import load_script

compare_runs = load_script("compare_runs")


def _write(folder, seed, hs_bits, items="abc", point="finetune-p0.1"):
    run = folder / f"seed{seed}"
    run.mkdir(parents=True)
    outcomes = {"harmful_score": {"items": items, "bits": encode_outcomes(hs_bits)}}
    results = {"complete": True, "seed": seed, "stages": {point: {"outcomes": outcomes}}}
    (run / "results.json").write_text(json.dumps(results))


def test_the_difference_pairs_by_seed_and_skips_a_seed_one_arm_lacks(tmp_path):
    treated, control = tmp_path / "variant", tmp_path / "setting"
    _write(treated, 44, [1, 1, 0, 0])
    _write(treated, 45, [1, 0, 0, 0])
    _write(treated, 46, [1, 1, 1, 1])  # no control at seed 46: not paired
    _write(control, 44, [1, 1, 1, 0])
    _write(control, 45, [1, 1, 1, 0])
    lines = compare_runs.compare(treated, control, ["finetune"])
    assert "seeds 44, 45" in lines[0]
    (row,) = [line for line in lines if line.startswith("| finetune | HS |")]
    # treated 3 of 8, control 6 of 8: −37.5 points, computed by hand
    assert row.startswith("| finetune | HS | 37.5 | 75.0 | -37.5 [")


def test_outcomes_over_different_prompts_refuse_to_pair(tmp_path):
    _write(tmp_path / "a", 44, [1, 0], items="abc")
    _write(tmp_path / "b", 44, [1, 0], items="xyz")
    with pytest.raises(SystemExit, match="over different prompts"):
        compare_runs.compare(tmp_path / "a", tmp_path / "b", ["finetune"])


def test_no_common_seed_says_which_seeds_each_has(tmp_path):
    _write(tmp_path / "a", 44, [1, 0])
    _write(tmp_path / "b", 45, [1, 0])
    with pytest.raises(SystemExit, match=r"no seed in common: a has \['44'\], b has \['45'\]"):
        compare_runs.compare(tmp_path / "a", tmp_path / "b", ["finetune"])
