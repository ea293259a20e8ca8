"""scripts/paired_tails.py: the simulation behind docs/testbed.md's "How far the p-values can be trusted"."""

from __future__ import annotations

import json

from script_module import load_script

tails = load_script("paired_tails")


def test_a_simulated_setting_reports_each_test_s_null_rejections_and_both_is_the_stricter(tmp_path):
    result = tails.simulate(het=0.1, tau=0.05, sims=40)
    assert result["sims"] == 40 and result["seed_sd"] > 0
    for alpha in ("0.05", "0.01", "0.005"):
        rates = result["rejections"][alpha]
        # rejecting when both do can never happen more often than either alone
        assert 0.0 <= rates["both"] <= min(rates["bootstrap"], rates["seed_t"]) <= 1.0
    # a larger α rejects at least as often
    assert result["rejections"]["0.05"]["bootstrap"] >= result["rejections"]["0.005"]["bootstrap"]
    text = tails.markdown([result])
    assert text.splitlines()[2].startswith("| 0.1 | 0.05 |")


def test_the_command_writes_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setattr(tails, "SETTINGS", [(0.1, 0.02)])
    tails.main(["--out", str(tmp_path), "--sims", "5"])
    data = json.loads((tmp_path / "tails.json").read_text())
    assert [s["tau"] for s in data["settings"]] == [0.02]
    assert (tmp_path / "tails.md").read_text().startswith("# Null rejection rates")
