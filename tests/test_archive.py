"""The archived CPU sweeps and the page written from them agree: docs/RESULTS.md regenerates byte for byte from
docs/results/ with today's readers (one results vocabulary, ftguard.metrics and ftguard.run_results)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from script_module import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_results_md_regenerates_byte_identical_from_the_archive():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        load_script("make_results_md").main(
            str(ROOT / "docs" / "results" / "cpu-smollm2"),
            str(ROOT / "docs" / "results" / "cpu-smollm2-attack"),
        )
    assert out.getvalue() == (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
