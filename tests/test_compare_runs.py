"""scripts/compare_runs.py: any two defenses of a sweep paired over their common seeds and prompts."""

from __future__ import annotations

import json

import pytest

from ftguard.evaluation.paired import encode_outcomes
from script_module import load_script

compare_runs = load_script("compare_runs")


def _write(folder, seed, hs_bits, items="abc", points=("finetune-p0.1",), attack=None):
    run = folder / (f"attack={attack}-seed{seed}" if attack else f"seed{seed}")
    run.mkdir(parents=True)
    outcomes = {"harmful_score": {"items": items, "bits": encode_outcomes(hs_bits)}}
    stages = {point: {"outcomes": outcomes} for point in points}
    results = {"complete": True, "seed": seed, "stages": stages}
    (run / "results.json").write_text(json.dumps(results))


def test_the_difference_pairs_by_seed_and_skips_a_seed_one_arm_lacks(tmp_path):
    treated, control = tmp_path / "variant", tmp_path / "setting"
    _write(treated, 44, [1, 1, 0, 0])
    _write(treated, 45, [1, 0, 0, 0])
    _write(treated, 46, [1, 1, 1, 1])  # no control at seed 46: not paired
    _write(control, 44, [1, 1, 1, 0])
    _write(control, 45, [1, 1, 1, 0])
    lines = compare_runs.compare(treated, control, ["finetune"])
    assert "paired over seed44, seed45 " in lines[0]
    (row,) = [line for line in lines if line.startswith("| finetune | HS |")]
    # treated 3 of 8, control 6 of 8: −37.5 points, computed by hand
    assert row.startswith("| finetune | HS | 37.5 | 75.0 | -37.5 [")
    # seed 44 parts on one prompt, seed 45 on two
    assert row.endswith("| 3 of 8 |")
    (row,) = [
        line
        for line in compare_runs.compare(treated, control, ["finetune"], only="seed45")
        if line.startswith("| finetune | HS |")
    ]
    assert row.startswith("| finetune | HS | 25.0 | 75.0 | -50.0 [") and row.endswith("| 2 of 4 |")


def test_outcomes_over_different_prompts_refuse_to_pair(tmp_path):
    _write(tmp_path / "a", 44, [1, 0], items="abc")
    _write(tmp_path / "b", 44, [1, 0], items="xyz")
    with pytest.raises(SystemExit, match="over different prompts"):
        compare_runs.compare(tmp_path / "a", tmp_path / "b", ["finetune"])


def test_no_common_seed_says_which_seeds_each_has(tmp_path):
    _write(tmp_path / "a", 44, [1, 0])
    _write(tmp_path / "b", 45, [1, 0])
    with pytest.raises(SystemExit, match=r"no run in common: a has \['seed44'\], b has \['seed45'\]"):
        compare_runs.compare(tmp_path / "a", tmp_path / "b", ["finetune"])


def test_runs_pair_by_attack_setting_and_seed_not_by_seed_alone(tmp_path):
    # an attack suite's defense folder holds one run per attack and seed: Virus pairs with Virus
    _write(tmp_path / "a", 44, [1, 1], attack="harmful_mix")
    _write(tmp_path / "a", 44, [0, 0], attack="virus")
    _write(tmp_path / "b", 44, [1, 1], attack="harmful_mix")
    _write(tmp_path / "b", 44, [1, 1], attack="virus")
    lines = compare_runs.compare(tmp_path / "a", tmp_path / "b", ["finetune"])
    assert "paired over attack=harmful_mix-seed44, attack=virus-seed44" in lines[0]
    (row,) = [line for line in lines if line.startswith("| finetune | HS |")]
    assert row.startswith("| finetune | HS | 50.0 | 100.0 | -50.0 [")


def test_a_run_of_several_ratios_needs_the_ratio_named(tmp_path):
    points = ("finetune-p0", "finetune-p0.1")
    _write(tmp_path / "a", 44, [1, 0], points=points)
    _write(tmp_path / "b", 44, [0, 0], points=points)
    with pytest.raises(SystemExit, match="finetune-p0, finetune-p0.1: choose one ratio with --p"):
        compare_runs.compare(tmp_path / "a", tmp_path / "b", ["finetune"])
    lines = compare_runs.compare(tmp_path / "a", tmp_path / "b", ["finetune"], p=0.1)
    assert "at p = 0.1" in lines[0] and any(
        line.startswith("| finetune | HS | 50.0 | 0.0 |") for line in lines
    )
