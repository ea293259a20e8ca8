"""The metrics table every report reads, and the typed reader of results.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ftguard.errors import FtguardError
from ftguard.gate import CHECKS, GateConfig
from ftguard.metrics import GATED, HEADLINE, METRICS, RUN_TABLE
from ftguard.run_results import STAGES, parse_results, read_results

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / "docs" / "results" / "cpu-smollm2" / "runs"


def test_labels_and_directions_are_the_ones_the_reports_print():
    assert [METRICS[m].column for m in RUN_TABLE] == [
        "HS ↓",
        "HS+ ↓",
        "FA ↑",
        "over-refusal ↓",
        "IR ↓",
        "degenerate",
    ]
    assert [METRICS[m].abbrev for m in HEADLINE] == ["HS", "HS+", "FA", "OR", "IR"]
    # the gate's thresholds are fields of its config, ceilings before floors
    assert [CHECKS[m] for m in GATED] == [
        ("max_hs", "max"),
        ("max_hs_plus", "max"),
        ("max_over_refusal", "max"),
        ("min_fa", "min"),
    ]
    fields = {f.name for f in dataclasses.fields(GateConfig)}
    assert {name for name, _ in CHECKS.values()} <= fields


@pytest.mark.slow
def test_every_rate_the_pipeline_writes_is_in_the_table(tmp_path):
    from ftguard import cli
    from ftguard.pipeline.results import markdown_table

    out = tmp_path / "run"
    small = [
        "align=null",
        "finetune=null",
        "evaluate.points=[base]",
        "evaluate.harmful_prompts.n=4",
        "evaluate.over_refusal_prompts.n=4",
        "evaluate.task_n=4",
        "evaluate.instruction_prompts={source: alpaca_eval, split: eval, n: 4}",
    ]
    assert (
        cli.main(
            ["run", "quickstart-tiny", "--output-dir", str(out), *sum((["--set", s] for s in small), [])]
        )
        == 0
    )
    data = json.loads((out / "results.json").read_text())
    (entry,) = data["stages"].values()
    written = set(entry["counts"]) | set(entry["intervals"]) | {k for k in entry if k.endswith("_rate")}
    assert written <= set(METRICS), written - set(METRICS)
    always = {k for k, m in METRICS.items() if m.always}
    assert always <= set(entry), always - set(entry)
    assert {k for k, m in METRICS.items() if m.counted and m.always} == set(entry["counts"])

    run = read_results(out)
    (point,) = run.points.values()
    assert point.stage == "base" and run.final_points() == [point] and run.judge == "keyword"
    assert dict(point.metrics) == {k: entry[k] for k in METRICS if k in entry}
    assert (out / "results.md").read_text() == markdown_table(data)


def test_reader_round_trips_an_archived_run():
    path = ARCHIVE / "antidote" / "p0.1-seed42" / "results.json"
    raw = json.loads(path.read_text())
    run = read_results(path.parent)
    assert run == read_results(path) and run.path == path
    assert (run.name, run.model, run.seed, run.judge, run.complete) == (
        "cpu-smollm2-antidote-p0.1-seed42",
        "smollm2-135m",
        42,
        "minilm",
        True,
    )
    assert list(run.points) == list(raw["stages"]) == ["align", "finetune", "post"]
    for key, point in run.points.items():
        entry = raw["stages"][key]
        assert (point.stage, point.method, point.harmful_ratio, point.judge) == (
            entry["stage"],
            entry["method"],
            entry["harmful_ratio"],
            entry["judge"],
        )
        assert dict(point.metrics) == {m: entry[m] for m in METRICS if m in entry}
        assert {m: list(v) for m, v in point.intervals.items()} == entry["intervals"]
        assert {m: list(v) for m, v in point.counts.items()} == entry["counts"]
        assert point.entry == entry
    # the repaired model is the one the run ships; without a repair it is the fine-tuned one
    assert [p.key for p in run.final_points()] == ["post"] and run.last_trained_stage() == "post"
    sft = read_results(ARCHIVE / "sft" / "p0.1-seed42")
    assert sft.final_keys() == {"finetune"} and sft.last_trained_stage() == "finetune"


def test_the_reader_knows_every_evaluation_point_in_run_order():
    from ftguard.config import EVAL_POINTS

    assert STAGES == EVAL_POINTS


def _entry(stage: str, p: float | None) -> dict:
    return {"stage": stage, "method": "sft", "harmful_ratio": p, "harmful_score": 10.0}


def test_final_point_is_the_last_evaluated_stage_per_ratio():
    stages = {
        "base": _entry("base", None),
        "align": _entry("align", None),
        "finetune-p0": _entry("finetune", 0.0),
        "finetune-p0.1": _entry("finetune", 0.1),
        "post-p0.1": _entry("post", 0.1),  # p = 0 has no repaired point (yet): its fine-tune is final
    }
    run = parse_results({"stages": stages})
    assert [p.key for p in run.final_points()] == ["finetune-p0", "post-p0.1"]
    aligned_only = parse_results({"stages": {k: stages[k] for k in ("base", "align")}})
    assert [p.key for p in aligned_only.final_points()] == ["align"]
    assert parse_results({"stages": {}}).final_points() == []


def test_a_run_cut_off_before_its_shipped_stage_has_no_final_point():
    config = {"align": {"method": "sft"}, "finetune": {"method": "sft"}, "post": {"method": "safelora"}}
    stages = {"align": _entry("align", None), "finetune": _entry("finetune", 0.1)}
    # stopped between the fine-tune's evaluation and the repair: its fine-tune is not SafeLoRA's result
    cut = parse_results({"complete": False, "config": config, "stages": stages})
    assert cut.final_points() == []
    # once the repair is scored, it is final even before the run says complete
    repaired = {**stages, "post": _entry("post", 0.1)}
    running = parse_results({"complete": False, "config": config, "stages": repaired})
    assert [p.key for p in running.final_points()] == ["post"]
    # a finished run that did not evaluate its repair keeps the last evaluated model (the gate refuses it)
    done = parse_results({"complete": True, "config": config, "stages": stages})
    assert [p.key for p in done.final_points()] == ["finetune"]


def test_missing_or_malformed_results_fail_with_one_line_saying_what_to_do(tmp_path):
    with pytest.raises(FtguardError, match="results.json not found: give a run's output directory"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(FtguardError, match="not readable JSON .*delete it and `ftguard run`"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(FtguardError, match="not an ftguard results.json"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"stages": {"finetune": {"harmful_score": "high"}}}))
    with pytest.raises(FtguardError, match=r"stages\.finetune\.harmful_score must be a number"):
        read_results(tmp_path)
