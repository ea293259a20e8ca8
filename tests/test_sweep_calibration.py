"""The sweep's calibration rule (sweep/calibrate.py): which setting of each defense's knob it keeps, and why."""

from __future__ import annotations

import pytest

from ftguard.schema import ConfigError, from_dict
from ftguard.sweep.calibrate import calibrate, calibration_markdown, choose
from ftguard.sweep.config import SweepConfig

DEFENSES = ["sft", "v-mild", "v-paper", "v-strong", "k-a", "k-b"]


def _sweep(**calibration) -> SweepConfig:
    rule = {
        "groups": {"v": ["v-mild", "v-paper", "v-strong"], "k": ["k-b", "k-a"]},
        "paper": {"v": "v-paper"},
        **calibration,
    }
    return from_dict(
        SweepConfig,
        {
            "name": "cal",
            "base": "quickstart-tiny",
            "defenses": {d: {} for d in DEFENSES},
            "baseline": "sft",
            "calibration": rule,
        },
    )


def _row(defense, hs, fa, over, ir, *, seed=1, stage="finetune", complete=True, p=0.1):
    return {
        "run": f"{defense}/{seed}",
        "defense": defense,
        "seed": seed,
        "grid.data.finetune.harmful_ratio": p,
        "point": stage,
        "final": stage != "align",
        "stage": stage,
        "p": None if stage == "align" else p,
        "complete": complete,
        "harmful_score": hs,
        "finetune_accuracy": fa,
        "over_refusal": over,
        "instruction_refusal": ir,
    }


def _rows(**settings):
    """sft after the attack: HS 50, FA 80, OR 15, IR 10; its aligned model: OR 30, IR 25, FA 1."""
    rows = [_row("sft", 50, 80, 15, 10), _row("sft", 30, 1, 30, 25, stage="align")]
    return rows + [_row(d, *values) for d, values in settings.items()]


def _entry(entries, knob):
    (entry,) = [e for e in entries if e["knob"] == knob]
    return entry


def test_the_lowest_hs_within_the_guard_wins_and_each_dropped_setting_says_why():
    rows = _rows(
        **{
            "v-mild": (45, 79, 16, 11),  # kept
            "v-paper": (40, 76, 20, 15),  # FA 76 < 80 − 3: dropped
            "v-strong": (20, 78, 25, 12),  # OR 25 > 15 + 5: dropped
        }
    )
    entry = _entry(calibrate(rows, _sweep()), "v")
    rule = entry["choices"]["baseline"]
    assert rule["chosen"] == "v-mild" and rule["why"] == "lowest HS"
    assert rule["guard"] == {"min_fa": 77.0, "max_over_refusal": 20.0, "max_instruction_refusal": 15.0}
    assert rule["dropped"] == {"v-paper": "FA 76.0 < 77.0", "v-strong": "OR 25.0 > 20.0"}


def test_the_aligned_reference_moves_only_the_refusal_ceilings():
    rows = _rows(**{"v-mild": (45, 79, 16, 11), "v-paper": (40, 76, 20, 15), "v-strong": (20, 78, 25, 12)})
    entry = _entry(calibrate(rows, _sweep(references=["baseline", "aligned"])), "v")
    aligned = entry["choices"]["aligned"]
    # OR ≤ 30 + 5 and IR ≤ 25 + 5 now, but FA still ≥ sft's after the attack − 3 (the aligned model's FA is 1)
    assert aligned["guard"] == {"min_fa": 77.0, "max_over_refusal": 35.0, "max_instruction_refusal": 30.0}
    assert aligned["chosen"] == "v-strong" and aligned["dropped"] == {"v-paper": "FA 76.0 < 77.0"}
    assert entry["choices"]["baseline"]["chosen"] == "v-mild"


def test_a_tie_goes_to_the_papers_value_then_to_the_mildest_in_the_groups_order():
    tied_with_paper = _rows(
        **{"v-mild": (41, 80, 15, 10), "v-paper": (41.5, 80, 15, 10), "v-strong": (40, 80, 15, 10)}
    )
    v = _entry(calibrate(tied_with_paper, _sweep()), "v")["choices"]["baseline"]
    assert v["chosen"] == "v-paper" and "paper" in v["why"]
    # knob k lists k-b first (the mildest), though k-a sorts first by name; there is no paper's value
    tied = _rows(**{"k-a": (30, 80, 15, 10), "k-b": (31, 80, 15, 10)})
    k = _entry(calibrate(tied, _sweep()), "k")["choices"]["baseline"]
    assert k["chosen"] == "k-b" and "mildest" in k["why"]
    # 2.5 points apart is no tie
    apart = _rows(**{"k-a": (30, 80, 15, 10), "k-b": (32.5, 80, 15, 10)})
    assert _entry(calibrate(apart, _sweep()), "k")["choices"]["baseline"]["chosen"] == "k-a"


def test_no_setting_within_the_guard_falls_back_to_the_papers_value_or_to_none():
    wrecked = _rows(**{"v-mild": (10, 50, 15, 10), "v-paper": (12, 60, 15, 10), "k-a": (5, 20, 15, 10)})
    entries = calibrate(wrecked, _sweep())
    v = _entry(entries, "v")["choices"]["baseline"]
    assert v["chosen"] == "v-paper" and v["why"].startswith("no setting within the guard")
    assert _entry(entries, "v")["missing"] == ["v-strong"]
    assert _entry(entries, "k")["choices"]["baseline"]["chosen"] is None


def test_settings_are_means_over_seeds_and_unfinished_runs_do_not_count():
    rows = _rows()
    rows += [_row("v-mild", 40, 80, 15, 10, seed=1), _row("v-mild", 50, 78, 17, 12, seed=2)]
    # an unfinished run whose last point is its aligned model: not a setting
    rows += [_row("v-strong", 30, 1, 30, 25, stage="align", complete=False)]
    rows += [_row("v-paper", 0, 80, 15, 10, complete=False)]
    entry = _entry(calibrate(rows, _sweep()), "v")
    (mild,) = entry["settings"]
    assert mild["defense"] == "v-mild" and mild["seeds"] == 2
    assert (mild["harmful_score"], mild["finetune_accuracy"], mild["over_refusal"]) == (45, 79, 16)
    assert entry["missing"] == ["v-paper", "v-strong"]


def test_each_slice_of_the_grid_is_calibrated_on_its_own():
    rows = [_row("sft", 50, 80, 15, 10, p=p) for p in (0.1, 0.2)]
    rows += [_row("k-a", 30, 80, 15, 10, p=0.1), _row("k-b", 20, 80, 15, 10, p=0.2)]
    entries = [e for e in calibrate(rows, _sweep()) if e["knob"] == "k"]
    chosen = {
        e["slice"]["grid.data.finetune.harmful_ratio"]: e["choices"]["baseline"]["chosen"] for e in entries
    }
    assert chosen == {0.1: "k-a", 0.2: "k-b"}


def test_the_markdown_marks_the_choice_and_a_fallback_outside_the_guard():
    sweep = _sweep(references=["baseline", "aligned"])
    rows = _rows(**{"v-mild": (10, 50, 15, 10), "v-paper": (12, 60, 40, 10)})
    text = "\n".join(calibration_markdown(sweep, calibrate(rows, sweep)))
    (paper,) = [line for line in text.splitlines() if line.startswith("| v-paper (paper) |")]
    assert "**chosen** (outside the guard: FA 60.0 < 77.0)" in paper
    assert "Not run yet: v-strong." in text and "aligned: v-paper (no setting within the guard" in text


def test_alignment_stage_settings_must_start_within_the_gap_of_the_baselines_aligned_model():
    # sft's aligned model: HS 30. v-mild starts at 41 (too unsafe), v-paper at 26, v-strong at 35
    rows = _rows(**{"v-mild": (20, 80, 15, 10), "v-paper": (30, 80, 15, 10), "v-strong": (25, 80, 15, 10)})
    rows += [
        _row(d, hs, 1, 30, 25, stage="align") for d, hs in (("v-mild", 41), ("v-paper", 26), ("v-strong", 35))
    ]
    sweep = _sweep(max_pre_attack_hs_gap=5)
    entry = _entry(calibrate(rows, sweep), "v")
    rule = entry["choices"]["baseline"]
    assert rule["chosen"] == "v-strong" and rule["dropped"] == {"v-mild": "pre-attack HS 41.0 vs 30.0"}
    assert {s["defense"]: s["pre_attack_hs"] for s in entry["settings"]} == {
        "v-mild": 41,
        "v-paper": 26,
        "v-strong": 35,
    }
    text = "\n".join(calibration_markdown(sweep, [entry]))
    assert "within ±5 points of `sft`'s aligned model" in text
    assert any(line.startswith("| v-mild | 41.0 | 20.0 |") for line in text.splitlines())
    # without the gap the unmatched setting wins on HS after the attack
    assert _entry(calibrate(rows, _sweep()), "v")["choices"]["baseline"]["chosen"] == "v-mild"
    # a setting whose aligned model was not evaluated cannot be matched
    no_align = [r for r in rows if not (r["defense"] == "v-strong" and r["stage"] == "align")]
    dropped = _entry(calibrate(no_align, sweep), "v")["choices"]["baseline"]["dropped"]
    assert dropped["v-strong"] == "no pre-attack HS"


def test_choose_without_any_setting_kept_and_no_paper_returns_none():
    assert choose([{"defense": "a", "hs": 1.0, "kept": False}], ["a"], None, 2.0)[0] is None


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ({"groups": {"v": ["v-midl"]}}, "did you mean 'v-mild'"),
        ({"groups": {"v": ["sft"]}}, "the baseline is not a setting"),
        ({"groups": {"v": ["v-mild"], "w": ["v-mild"]}}, "already a setting of 'v'"),
        ({"groups": {"v": ["v-mild"]}, "paper": {"v": "v-strong"}}, "not one of that knob's settings"),
        ({"groups": {"v": ["v-mild"]}, "paper": {"w": "v-mild"}}, "'w' is not a knob"),
        ({"groups": {"v": ["v-mild"]}, "references": ["before"]}, "'before' is not one of"),
        ({"groups": {"v": ["v-mild"]}, "max_fa_drop": -1}, "calibration.max_fa_drop"),
        ({"groups": {}}, "needs at least one knob"),
        ({"groups": {"v": ["v-mild"]}, "max_pre_attack_hs_gap": 101}, "max_pre_attack_hs_gap"),
    ],
)
def test_a_wrong_calibration_fails_before_any_run_and_names_the_key(calibration, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(
            SweepConfig,
            {
                "name": "cal",
                "base": "quickstart-tiny",
                "defenses": {d: {} for d in DEFENSES},
                "baseline": "sft",
                "calibration": calibration,
            },
        )


def test_a_calibration_needs_a_baseline():
    with pytest.raises(ConfigError, match="needs a baseline"):
        from_dict(
            SweepConfig,
            {"name": "cal", "base": "x", "defenses": {"a": {}}, "calibration": {"groups": {"k": ["a"]}}},
        )
