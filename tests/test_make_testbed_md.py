"""scripts/make_testbed_md.py: the testbed's RESULTS page frames each sweep's report and marks what is missing."""

from __future__ import annotations

import json
import sys

from script_module import SCRIPTS, load_script


def test_missing_sweeps_are_pending_and_a_report_section_is_framed(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # the script imports its sibling scripts
    page = load_script("make_testbed_md")
    attack = tmp_path / "attack"
    attack.mkdir()
    (attack / "report.md").write_text(
        "# Sweep `x`\n\nintro\n\n## Attack curve: each setting\n\n| sft | 1 |\n\n"
        "## Adaptive attack\n\nother\n\n**Incomplete: 1 of 2 runs finished.**\n"
    )
    (attack / "report.json").write_text(json.dumps({"complete_runs": 1, "runs": 2}))
    monkeypatch.setattr(sys, "argv", ["make_testbed_md.py", "--attack", str(attack)])
    page.main()
    text = capsys.readouterr().out
    assert "### Attack curve: each setting\n\n| sft | 1 |" in text
    assert "1 of 2 runs finished (**incomplete**" in text
    assert "Adaptive attack" not in text and "**Incomplete:" not in text  # only the named section
    assert "(`sweeps/testbed-study`): pending." in text
    assert "(`sweeps/testbed-study-uncalibrated`): pending." in text
    assert "Pending: the calibration sweep has not run." in text
    assert "Pending: the study has not run yet" in text
