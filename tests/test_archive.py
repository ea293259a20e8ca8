"""The archived CPU sweeps and the pages written from them agree: docs/RESULTS.md (the testbed) and
docs/RESULTS-strong-protocol.md (the old protocol) regenerate byte for byte from docs/results/ with today's readers
(one results vocabulary, ftguard.metrics and ftguard.run_results)."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from script_module import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_the_old_protocol_page_regenerates_byte_identical_from_the_archive():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        load_script("make_results_md").main(
            str(ROOT / "docs" / "results" / "cpu-smollm2"),
            str(ROOT / "docs" / "results" / "cpu-smollm2-attack"),
        )
    assert out.getvalue() == (ROOT / "docs" / "RESULTS-strong-protocol.md").read_text(encoding="utf-8")


def test_the_testbed_page_regenerates_byte_identical_from_the_archive(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # the script imports its sibling scripts
    page = load_script("make_testbed_md")
    archive = ROOT / "docs" / "results"
    argv = ["make_testbed_md.py"]
    for key, sweep in page.SWEEPS.items():
        argv += [f"--{key.replace('_', '-')}", str(archive / sweep)]
    argv += ["--audits", str(archive / "audits"), "--rescored", str(archive / "testbed-study-rescored")]
    monkeypatch.setattr(sys, "argv", argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        page.main()
    assert out.getvalue() == (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")


def test_the_ledger_verdicts_regenerate_from_the_archive():
    verdicts = load_script("make_verdicts")
    archive = ROOT / "docs" / "results"
    folders = (
        archive / "testbed-study",
        archive / "testbed-study-strong",
        archive / "testbed-study-uncalibrated",
    )
    body = verdicts.render(*folders)
    page = (ROOT / "docs" / "REPRODUCTION.md").read_text(encoding="utf-8")
    assert verdicts.replace_between_markers(page, body) == page
    # and the ledger's testbed columns, row by row
    assert verdicts.fill_ledger(page, verdicts.ledger_cells(folders)) == page


def test_the_cross_judges_held_out_table_regenerates_from_its_folds():
    table = load_script("make_cross_judge_md")
    page = (ROOT / "docs" / "judges.md").read_text(encoding="utf-8")
    assert table.replace_between_markers(page, table.render()) == page
    # every fold's file is in the table, one row per source it held out
    rows = table.render().splitlines()[2:]
    assert len(rows) == sum(len(f["by_source"]) for f in table.folds(table.RESULTS)) >= 2
