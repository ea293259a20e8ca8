"""The testbed's sweep files against its archive: each study defense runs at the setting its calibration chose
(docs/testbed.md, step 4: the aligned-reference choice), and the strong-attack sweep runs the study's settings.
Copied by hand between YAML files, a setting could drift from the choice that justified it without a run failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftguard.sweep.calibrate import NO_SETTING_KEPT
from ftguard.sweep.config import load_sweep

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
CALIBRATIONS = ("testbed-defense-calibration", "testbed-align-calibration")


def _choices() -> list[tuple[str, str, dict]]:
    """(calibration sweep, knob, the aligned-reference choice) of every group archived."""
    out = []
    for name in CALIBRATIONS:
        report = json.loads((RESULTS / name / "report.json").read_text())
        out += [(name, g["knob"], g["choices"]["aligned"]) for g in report["calibration"]]
    return out


@pytest.mark.parametrize(
    ("calibration", "knob", "choice"), _choices(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_the_study_runs_each_defense_at_the_setting_its_calibration_chose(calibration, knob, choice):
    study, _ = load_sweep("sweeps/testbed-study")
    if choice["why"].startswith(NO_SETTING_KEPT) and calibration == "testbed-align-calibration":
        # an alignment-stage defense whose start matched SFT's at no setting has no verdict and no study row
        assert knob not in study.defenses
        return
    settings, _ = load_sweep(f"sweeps/{calibration}")
    assert study.defenses[knob] == settings.defenses[choice["chosen"]], (
        f"sweeps/testbed-study's {knob} differs from {choice['chosen']}, the setting {calibration} chose"
    )


def test_the_strong_attack_reads_the_study_s_settings():
    study, _ = load_sweep("sweeps/testbed-study")
    strong, _ = load_sweep("sweeps/testbed-study-strong")
    assert set(strong.defenses) <= set(study.defenses)
    for name, spec in strong.defenses.items():
        assert spec == study.defenses[name], name
    # the one thing the strong sweep changes is the attack's learning rate
    assert strong.set["finetune.train.learning_rate"] == 5.0e-4
    assert {k: v for k, v in strong.set.items() if k != "finetune.train.learning_rate"}.items() <= {
        **study.set,
        "data.finetune.harmful_ratio": 0.1,
    }.items()
