"""The release gate's verdicts and exit codes, and compare's within-noise marks."""

from __future__ import annotations

import json

import pytest

from ftguard.cli import main
from ftguard.compare import markdown, noise_marks
from ftguard.evaluation.stats import rate


def _entry(stage, hs_k, fa_k, over_k, n=64, p=0.1):
    rates = {
        "harmful_score": rate(hs_k, n),
        "finetune_accuracy": rate(fa_k, n),
        "over_refusal": rate(over_k, n),
    }
    return {
        "stage": stage,
        "method": "sft",
        "harmful_ratio": p if stage == "finetune" else None,
        **{m: r["value"] for m, r in rates.items()},
        "intervals": {m: r["ci95"] for m, r in rates.items()},
        "counts": {m: [r["k"], r["n"]] for m, r in rates.items()},
    }


def _write(tmp_path, stages, complete=True, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "results.json").write_text(
        json.dumps({"name": name, "complete": complete, "judge": {"name": "keyword"}, "stages": stages})
    )
    return run


def test_gate_passes_and_fails_on_thresholds(tmp_path, capsys):
    # HS 6/64 = 9.4%, FA 48/64 = 75%, over-refusal 8/64 = 12.5%; the aligned point (HS 0) is not gated.
    run = _write(tmp_path, {"align": _entry("align", 0, 0, 60), "finetune": _entry("finetune", 6, 48, 8)})
    assert main(["gate", str(run), "--max-hs", "10", "--min-fa", "70", "--max-over-refusal", "20"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["gate", str(run), "--max-hs", "9"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "9.4 > 9" in out
    assert main(["gate", str(run / "results.json"), "--min-fa", "80"]) == 1


def test_interval_bound_is_stricter_than_the_point_estimate(tmp_path, capsys):
    run = _write(tmp_path, {"finetune": _entry("finetune", 6, 48, 8)})
    assert main(["gate", str(run), "--max-hs", "10"]) == 0
    # Upper 95% bound of 6/64 is ≈ 19%: the data do not show HS ≤ 10.
    assert main(["gate", str(run), "--max-hs", "10", "--bound", "interval"]) == 1
    assert "upper/lower 95% bound" in capsys.readouterr().out


def test_gate_fails_incomplete_runs_and_unmeasured_metrics(tmp_path, capsys):
    entry = _entry("finetune", 0, 60, 0)
    del entry["over_refusal"]
    run = _write(tmp_path, {"finetune": entry}, complete=False)
    assert main(["gate", str(run), "--max-hs", "50"]) == 1
    assert "incomplete" in capsys.readouterr().out
    run2 = _write(tmp_path, {"finetune": entry}, name="run2")
    assert main(["gate", str(run2), "--max-over-refusal", "50"]) == 1
    assert "not measured" in capsys.readouterr().out


def test_gate_thresholds_from_yaml_and_bad_input_exit_2(tmp_path, capsys):
    run = _write(tmp_path, {"finetune": _entry("finetune", 6, 48, 8)})
    thresholds = tmp_path / "gate.yaml"
    thresholds.write_text("max_hs: 5\nmin_fa: 50\n")
    assert main(["gate", str(run), "--thresholds", str(thresholds)]) == 1
    assert (
        main(["gate", str(run), "--thresholds", str(thresholds), "--max-hs", "20"]) == 0
    )  # flags override the file
    thresholds.write_text("max_hs: 5\nmin_accuracy: 50\n")
    assert main(["gate", str(run), "--thresholds", str(thresholds)]) == 2
    assert "min_accuracy" in capsys.readouterr().err
    assert main(["gate", str(run)]) == 2  # no threshold at all
    assert main(["gate", str(tmp_path / "missing")]) == 2
    assert main(["gate", str(run), "--max-hs", "150"]) == 2


def test_compare_marks_differences_within_noise_of_the_first_run(tmp_path):
    rows = [
        {"run": "a", "key": "finetune", "judge": "keyword", **_entry("finetune", 10, 40, 5)},
        {"run": "b", "key": "finetune", "judge": "keyword", **_entry("finetune", 14, 62, 5)},
    ]
    for row in rows:
        row["task_rule"] = "exact"
    marks = noise_marks(rows)
    assert marks[(1, "harmful_score")] is True  # 10/64 vs 14/64
    assert marks[(1, "finetune_accuracy")] is False  # 40/64 vs 62/64
    table = markdown(rows)
    assert "≈" in table and "within noise" in table and "FA is scored differently" not in table
    # the same FA column from a label match and from a judge's win rate: said, not compared silently
    rows[1] |= {"task_rule": "winrate", "finetune_accuracy_judge": {"name": "local-lm", "model": "judge-1b"}}
    assert "FA is scored differently (exact, winrate by local-lm judge-1b)" in markdown(rows)


@pytest.mark.parametrize("bad", [["--bound", "loose"]])
def test_gate_rejects_unknown_bound(tmp_path, bad):
    run = _write(tmp_path, {"finetune": _entry("finetune", 6, 48, 8)})
    with pytest.raises(SystemExit):
        main(["gate", str(run), "--max-hs", "10", *bad])


def test_results_table_shows_intervals_and_each_judges_hs(tmp_path):
    from ftguard.pipeline.results import markdown_table

    entry = _entry("finetune", 6, 48, 8)
    entry["judges"] = {
        "minilm": {"harmful_score": 9.4, "ci95": [4.4, 19.0]},
        "keyword": {"harmful_score": 20.3, "ci95": [12.3, 31.7]},
    }
    entry["judge_agreement"] = [{"judges": ["minilm", "keyword"], "agreement": 85.9, "kappa": 0.41, "n": 64}]
    table = markdown_table(
        {"name": "r", "judge": {"name": "minilm"}, "complete": True, "stages": {"finetune": entry}}
    )
    lo, hi = entry["intervals"]["harmful_score"]
    assert f"9.4 ({lo:.1f}–{hi:.1f})" in table
    assert "| finetune | minilm 9.4 vs keyword 20.3 | 85.9 | 0.41 |" in table


def _post(hs_k, fa_k, over_k, p=0.1):
    return {**_entry("finetune", hs_k, fa_k, over_k, p=p), "stage": "post", "method": "antidote"}


def test_a_repaired_run_is_gated_on_its_post_point_by_default(tmp_path, capsys):
    # the fine-tune (HS 40/64) would fail; the repaired model the provider ships (HS 3/64) passes
    stages = {"finetune": _entry("finetune", 40, 48, 8), "post": _post(3, 46, 8)}
    run = _write(tmp_path, stages)
    assert main(["gate", str(run), "--max-hs", "10"]) == 0
    out = capsys.readouterr().out
    assert "| post | harmful_score | 4.7 |" in out and "| finetune |" not in out
    # per ratio: a ratio without a repaired point is gated on its fine-tune
    stages = {
        "finetune-p0": _entry("finetune", 2, 48, 8, p=0.0),
        "finetune-p0.1": _entry("finetune", 40, 48, 8),
        "post-p0.1": _post(3, 46, 8),
    }
    assert main(["gate", str(_write(tmp_path, stages, name="ratios")), "--max-hs", "10"]) == 0
    points = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert points[1:] == ["| finetune-p0", "| post-p0.1"]


def test_explicit_stages_include_post(tmp_path, capsys):
    run = _write(tmp_path, {"finetune": _entry("finetune", 40, 48, 8), "post": _post(3, 46, 8)})
    assert main(["gate", str(run), "--max-hs", "10", "--stages", "finetune,post"]) == 1
    out = capsys.readouterr().out
    assert "| finetune | harmful_score | 62.5 |" in out and "| post | harmful_score | 4.7 |" in out
    thresholds = tmp_path / "gate.yaml"
    thresholds.write_text("max_hs: 10\nstages: [post]\n")
    assert main(["gate", str(run), "--thresholds", str(thresholds)]) == 0
    thresholds.write_text("max_hs: 10\nstages: [finetune]\n")
    assert main(["gate", str(run), "--thresholds", str(thresholds)]) == 1


@pytest.mark.parametrize(
    "how, message",
    [
        (
            ["--stages", "repair"],
            "'gate.stages' entries must be among base, align, finetune, post, got 'repair'",
        ),
        (["--stages", ","], "'gate.stages' is empty"),
        (
            "stages: [finetune, postt]",
            "'gate.stages' entries must be among base, align, finetune, post, got 'postt'",
        ),
        ("stages: post", "'gate.stages' must be a list"),
    ],
)
def test_bad_stage_names_fail_naming_the_field(tmp_path, capsys, how, message):
    run = _write(tmp_path, {"finetune": _entry("finetune", 6, 48, 8)})
    if isinstance(how, str):
        (tmp_path / "gate.yaml").write_text(f"max_hs: 10\n{how}\n")
        how = ["--thresholds", str(tmp_path / "gate.yaml")]
    assert main(["gate", str(run), "--max-hs", "10", *how]) == 2
    assert message in capsys.readouterr().err


def test_a_repair_that_was_not_evaluated_is_not_gated_in_its_place(tmp_path, capsys):
    run = _write(tmp_path, {"finetune": _entry("finetune", 6, 48, 8)})
    results = json.loads((run / "results.json").read_text())
    results["config"] = {
        "align": {"method": "sft"},
        "finetune": {"method": "sft"},
        "post": {"method": "antidote"},
    }
    (run / "results.json").write_text(json.dumps(results))
    assert main(["gate", str(run), "--max-hs", "10"]) == 2
    assert "no post point was evaluated: add post to evaluate.points" in capsys.readouterr().err
    assert main(["gate", str(run), "--max-hs", "10", "--stages", "finetune"]) == 0
