"""`ftguard bench`: structure and arithmetic of the report (no timing assertions: timings belong to benchmarks)."""

from __future__ import annotations

import json

import pytest

from ftguard import cli
from ftguard.bench import BenchSpec, markdown, run_bench

pytestmark = pytest.mark.slow


def test_report_has_ratios_to_sft_measured_in_the_same_run(tmp_path):
    spec = BenchSpec(methods=["sft"], seq_len=192, batch_size=2, warmup=0, steps=2, rounds=1)
    report = run_bench(spec, tmp_path, memory=True)
    sft = report["methods"]["sft"]
    assert sft["time_ratio"] == 1.0 and sft["memory_ratio"] == 1.0 and sft["steps"] == 2
    assert len(sft["step_times_s"]) == 2 and min(sft["step_times_s"]) > 0
    assert sft["peak_memory_bytes"] > 0
    assert "| sft |" in markdown(report)


def test_cli_writes_json_and_rejects_unknown_methods(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--methods",
        "sft",
        "--seq-len",
        "192",
        "--batch-size",
        "2",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--rounds",
        "1",
    ]
    assert cli.main([*args, "--no-memory", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"sft"} and "time_ratio" in report["methods"]["sft"]
    assert cli.main([*args, "--methods", "sft,vacine"]) == 2
    assert "unknown method(s) vacine" in capsys.readouterr().err


def test_a_method_variant_is_timed_with_its_args_changed(tmp_path):
    from ftguard.bench import _Fixture, check_methods, method_variant
    from ftguard.errors import FtguardError
    from ftguard.schema import ConfigError

    assert method_variant("repnoise:readout=sampled:readout_negatives=512") == (
        "repnoise",
        {"readout": "sampled", "readout_negatives": 512},
    )
    with pytest.raises(FtguardError, match="name:key=value"):
        method_variant("repnoise:readout")
    check_methods(["sft", "repnoise:readout=sampled"])
    with pytest.raises(FtguardError, match="unknown method.*nosuch:a=1"):
        check_methods(["nosuch:a=1"])
    with pytest.raises(ConfigError, match="readout"):
        check_methods(["repnoise:readout=approximately"])
    fixture = _Fixture(BenchSpec(methods=["repnoise:readout=sampled"], seq_len=64, batch_size=2))
    stage, method = fixture.method("repnoise:readout=sampled:alpha=0.5")
    assert stage == "align" and (method.config.readout, method.config.alpha) == ("sampled", 0.5)
