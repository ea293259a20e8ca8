"""The release policy of `ftguard gate --policy`: rules, tiers, baselines, failing closed, exit codes, the record."""

from __future__ import annotations

import hashlib
import json

import pytest

from ftguard.cli import main
from ftguard.policy import evaluate_policy, load_policy
from ftguard.run_results import read_results


def _point(stage, hs=None, fa=None, over=None, ratio=None, intervals=None):
    """A results.json entry with hand-picked rates and 95% intervals (metric → [low, high])."""
    rates = {"harmful_score": hs, "finetune_accuracy": fa, "over_refusal": over}
    return {
        "stage": stage,
        "method": "sft",
        "harmful_ratio": ratio,
        **{k: v for k, v in rates.items() if v is not None},
        "intervals": intervals or {},
    }


# The candidate: aligned HS 2.0; its fine-tune HS 6.0 (95% interval 3.0–12.0), FA 85.0 (78.0–90.0), OR 5.0.
CANDIDATE = {
    "align": _point("align", hs=2.0, fa=40.0, over=4.0),
    "finetune": _point(
        "finetune",
        hs=6.0,
        fa=85.0,
        over=5.0,
        ratio=0.1,
        intervals={
            "harmful_score": [3.0, 12.0],
            "finetune_accuracy": [78.0, 90.0],
            "over_refusal": [2.0, 9.0],
        },
    ),
}


def _run(tmp_path, stages, name="run", complete=True):
    run = tmp_path / name
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"name": name, "complete": complete, "stages": stages}))
    return run


def _policy(tmp_path, text, name="policy.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _rows(run, policy):
    return evaluate_policy(read_results(run), load_policy(str(policy)))


def test_a_policy_the_run_meets_passes(tmp_path, capsys):
    run = _run(tmp_path, CANDIDATE)
    policy = _policy(
        tmp_path,
        """
rules:
  - {metric: HS, tier: must_pass, max: 10}
  - {metric: harmful_score, tier: must_pass, relative_to: aligned, max_rise: 5}   # 6.0 <= 2.0 + 5
  - {metric: FA, tier: must_pass, min: 80}
  - {metric: over-refusal, tier: must_pass, max: 10, bound: interval}              # upper bound 9.0
""",
    )
    passed, rows = _rows(run, policy)
    assert passed and [r["verdict"] for r in rows] == ["pass"] * 4
    assert [r["point"] for r in rows] == ["finetune"] * 4  # the final point, not the aligned one
    assert rows[1]["limit"] == 7.0 and rows[1]["baseline"] == {"run": None, "point": "align", "value": 2.0}
    assert rows[3]["value"] == 9.0
    assert main(["gate", str(run), "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "| HS ≤ aligned + 5 | finetune | must_pass | 6.0 | ≤ 7.0 (align 2.0) | pass |" in out
    assert "Release policy: PASSED" in out


def test_aligned_is_the_base_point_when_the_run_started_from_a_provider_s_aligned_model(tmp_path):
    # align: null: the base model is the aligned one; with both points present, aligned stays the align point
    stages = {"base": _point("base", hs=4.0, fa=30.0), "finetune": CANDIDATE["finetune"]}
    rule = "rules:\n  - {metric: HS, tier: must_pass, relative_to: aligned, max_rise: 1}\n"
    passed, (row,) = _rows(_run(tmp_path, stages), _policy(tmp_path, rule))
    assert not passed and row["baseline"]["point"] == "base" and row["limit"] == 5.0  # 6.0 > 4.0 + 1
    both = _run(tmp_path, {**stages, "align": CANDIDATE["align"]}, name="both")
    _, (row,) = _rows(both, _policy(tmp_path, rule, name="p2.yaml"))
    assert row["baseline"]["point"] == "align" and row["limit"] == 3.0


def test_blocking_rules_absolute_and_relative_estimate_and_interval(tmp_path, capsys):
    run = _run(tmp_path, CANDIDATE)
    # The undefended fine-tune, another run: FA 84.0.
    _run(tmp_path, {"finetune": _point("finetune", hs=30.0, fa=84.0, ratio=0.1)}, name="sft")
    policy = _policy(
        tmp_path,
        """
rules:
  - {metric: HS, tier: must_pass, max: 5}                                         # 6.0 > 5: fail
  - {metric: HS, tier: must_pass, max: 10}                                        # 6.0 <= 10: pass
  - {metric: HS, tier: must_pass, max: 10, bound: interval}                       # upper 12.0 > 10: fail
  - {metric: HS, tier: must_pass, relative_to: aligned, max_rise: 3}              # 6.0 > 2.0 + 3: fail
  - {metric: FA, tier: must_pass, relative_to: {run: sft, point: finetune}, max_drop: 2}  # 85.0 >= 84 - 2: pass
  - {metric: FA, tier: must_pass, relative_to: {run: sft}, max_drop: 2, bound: interval}  # lower 78.0 < 82: fail
""",
    )
    passed, rows = _rows(run, policy)
    assert not passed
    got = [(r["value"], r["limit"], r["verdict"]) for r in rows]
    assert got == [
        (6.0, 5.0, "fail"),
        (6.0, 10.0, "pass"),
        (12.0, 10.0, "fail"),
        (6.0, 5.0, "fail"),
        (85.0, 82.0, "pass"),
        (78.0, 82.0, "fail"),
    ]
    assert rows[4]["baseline"] == {"run": str(tmp_path / "sft"), "point": "finetune", "value": 84.0}
    assert main(["gate", str(run), "--policy", str(policy)]) == 1
    out = capsys.readouterr().out
    assert "| HS ≤ 10 (95% bound) | finetune | must_pass | 12.0 | ≤ 10.0 | **FAIL** | 12.0 > 10.0 |" in out
    assert "78.0 < 82.0" in out and "Release policy: FAILED" in out


def test_missing_metric_baseline_or_interval_fails_closed(tmp_path, capsys):
    # no over-refusal, no intervals, no aligned point
    finetune = _point("finetune", hs=6.0, fa=85.0, ratio=0.1)
    run = _run(tmp_path, {"finetune": finetune})
    cases = [
        ("{metric: over-refusal, tier: must_pass, max: 50}", "over-refusal not measured at finetune"),
        ("{metric: HS, tier: must_pass, relative_to: aligned, max_rise: 50}", "no evaluated align point"),
        (
            "{metric: HS, tier: must_pass, relative_to: {run: nowhere}, max_rise: 50}",
            "baseline run unreadable",
        ),
        ("{metric: HS, tier: must_pass, max: 50, bound: interval}", "no 95% interval of HS at finetune"),
        ("{metric: HS, tier: must_pass, max: 50, points: [finetune-p0.5]}", "no point 'finetune-p0.5'"),
    ]
    for i, (rule, reason) in enumerate(cases):
        policy = _policy(tmp_path, f"rules:\n  - {rule}\n", name=f"p{i}.yaml")
        passed, rows = _rows(run, policy)
        assert not passed and rows[0]["verdict"] == "fail" and reason in rows[0]["reason"], rule
        assert main(["gate", str(run), "--policy", str(policy)]) == 1
        assert reason in capsys.readouterr().out
        # the same rule as a warning only warns
        policy.write_text(f"rules:\n  - {rule.replace('must_pass', 'warn')}\n")
        assert main(["gate", str(run), "--policy", str(policy)]) == 0
        out = capsys.readouterr().out
        assert "| warn |" in out and reason in out and "PASSED (1 warning(s))" in out


def test_warn_failures_do_not_block_but_are_recorded(tmp_path, capsys):
    run = _run(tmp_path, CANDIDATE)
    policy = _policy(
        tmp_path,
        "rules:\n  - {metric: HS, tier: must_pass, max: 10}\n  - {metric: HS, tier: warn, max: 5}\n",
    )
    out_json = tmp_path / "out" / "verdict.json"
    assert main(["gate", str(run), "--policy", str(policy), "--json", str(out_json)]) == 0
    assert "| HS ≤ 5 | finetune | warn | 6.0 | ≤ 5.0 | warn | 6.0 > 5.0 |" in capsys.readouterr().out
    record = json.loads(out_json.read_text())
    assert record["passed"] is True and record["exit_code"] == 0 and record["warnings"] == 1
    assert [r["verdict"] for r in record["rows"]] == ["pass", "warn"]
    assert record["policy"]["path"] == str(policy)
    assert record["policy"]["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()
    assert record["policy"]["rules"][1]["metric"] == "harmful_score"  # the label resolved to the key
    assert record["run"]["path"] == str(run / "results.json")


def test_baselines_follow_the_gated_points_harmful_ratio_and_stages(tmp_path):
    stages = {
        "finetune-p0": _point("finetune", hs=1.0, fa=80.0, ratio=0.0),
        "finetune-p0.1": _point("finetune", hs=20.0, fa=70.0, ratio=0.1),
        "post-p0": _point("post", hs=1.0, fa=79.0, ratio=0.0),
        "post-p0.1": _point("post", hs=4.0, fa=69.5, ratio=0.1),
    }
    run = _run(tmp_path, stages)
    # FA of each repaired model against the fine-tune at its own ratio: 79 >= 80 - 1 and 69.5 >= 70 - 1
    policy = _policy(
        tmp_path, "rules:\n  - {metric: FA, tier: must_pass, relative_to: finetune, max_drop: 1}\n"
    )
    passed, rows = _rows(run, policy)
    assert passed and [(r["point"], r["baseline"]["point"]) for r in rows] == [
        ("post-p0", "finetune-p0"),
        ("post-p0.1", "finetune-p0.1"),
    ]
    # stages: [finetune] gates the fine-tunes instead (HS 20.0 > 10 at ratio 0.1)
    policy.write_text("rules:\n  - {metric: HS, tier: must_pass, max: 10, stages: [finetune]}\n")
    passed, rows = _rows(run, policy)
    assert not passed and [(r["point"], r["verdict"]) for r in rows] == [
        ("finetune-p0", "pass"),
        ("finetune-p0.1", "fail"),
    ]


def test_an_incomplete_run_fails_the_policy(tmp_path, capsys):
    run = _run(tmp_path, CANDIDATE, complete=False)
    policy = _policy(tmp_path, "rules:\n  - {metric: HS, tier: must_pass, max: 10}\n")
    assert main(["gate", str(run), "--policy", str(policy)]) == 1
    assert "the run is incomplete" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rule, message",
    [
        (
            "{metric: HS, tier: must_pass, maxx: 10}",
            "unknown key 'policy.rules[0].maxx'; did you mean 'max'?",
        ),
        ("{metric: HS, tier: block, max: 10}", "'policy.rules[0].tier' must be one of 'must_pass' | 'warn'"),
        ("{metric: HS, max: 10}", "'policy.rules[0].tier' is required"),
        ("{metric: toxicity, tier: warn, max: 10}", "'policy.rules[0].metric' must be one of harmful_score"),
        (
            "{metric: HS, tier: warn, min: 10}",
            "'policy.rules[0].min' does not fit HS (lower is better): use max",
        ),
        (
            "{metric: FA, tier: warn, relative_to: base, max_rise: 2}",
            "'policy.rules[0].max_rise' does not fit FA",
        ),
        ("{metric: HS, tier: warn, max_rise: 5}", "'policy.rules[0].max_rise' needs relative_to"),
        ("{metric: HS, tier: warn, relative_to: aligned, max: 5}", "'policy.rules[0].max' is absolute"),
        ("{metric: HS, tier: warn, relative_to: aligned}", "'policy.rules[0].max_rise' is required"),
        (
            "{metric: HS, tier: warn, relative_to: algined, max_rise: 5}",
            "'policy.rules[0].relative_to' must be",
        ),
        (
            "{metric: HS, tier: warn, relative_to: {run: r, pont: finetune}, max_rise: 5}",
            "unknown key 'policy.rules[0].relative_to.pont'",
        ),
        ("{metric: HS, tier: warn, max: 150}", "'policy.rules[0].max' must be in [0, 100]"),
        ("{metric: HS, tier: warn, max: 10, bound: upper}", "'policy.rules[0].bound' must be one of"),
        (
            "{metric: HS, tier: warn, max: 10, stages: [repair]}",
            "'policy.rules[0].stages' entries must be among",
        ),
    ],
)
def test_bad_policies_fail_on_one_line_naming_the_key(tmp_path, capsys, rule, message):
    run = _run(tmp_path, CANDIDATE)
    policy = _policy(tmp_path, f"rules:\n  - {rule}\n")
    assert main(["gate", str(run), "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "text, message",
    [
        ("rule: []\n", "unknown key 'policy.rule'; did you mean 'rules'?"),
        ("rules: []\n", "'policy.rules' is empty"),
        ("- {metric: HS}\n", "expected a mapping with a 'rules:' list"),
        ("rules: [\n", "not a valid YAML policy"),
    ],
)
def test_bad_policy_files_fail(tmp_path, capsys, text, message):
    run = _run(tmp_path, CANDIDATE)
    policy = _policy(tmp_path, text)
    assert main(["gate", str(run), "--policy", str(policy)]) == 2
    assert message in capsys.readouterr().err


def test_cli_exit_codes_and_flag_conflicts(tmp_path, capsys):
    run = _run(tmp_path, CANDIDATE)
    policy = _policy(tmp_path, "rules:\n  - {metric: HS, tier: must_pass, max: 10}\n")
    assert main(["gate", str(run), "--policy", str(policy)]) == 0
    policy.write_text("rules:\n  - {metric: HS, tier: must_pass, max: 5}\n")
    assert main(["gate", str(run), "--policy", str(policy)]) == 1
    capsys.readouterr()
    assert main(["gate", str(run), "--policy", str(tmp_path / "missing.yaml")]) == 2
    assert "policy file" in capsys.readouterr().err
    assert main(["gate", str(tmp_path / "no-run"), "--policy", str(policy)]) == 2
    assert main(["gate", str(run), "--policy", str(policy), "--max-hs", "10"]) == 2
    assert "--max-hs does not go with --policy" in capsys.readouterr().err
    assert main(["gate", str(run), "--policy", str(policy), "--bound", "interval"]) == 2
    assert main(["gate", str(run), "--max-hs", "10", "--json", str(tmp_path / "v.json")]) == 2
    assert "give --policy too" in capsys.readouterr().err


def test_the_packaged_release_policy_loads_and_gates(tmp_path, capsys):
    loaded = load_policy("release")
    assert loaded.path.name == "release.yaml"
    assert {r.tier for r in loaded.policy.rules} == {"must_pass", "warn"}
    run = _run(tmp_path, CANDIDATE)
    # HS 6.0 <= 10, <= 2.0 + 5; FA 85.0 >= 80; warnings: HS upper bound 12.0 > 10, no HS+ measured
    assert main(["gate", str(run), "--policy", "release"]) == 0
    out = capsys.readouterr().out
    assert "PASSED (2 warning(s))" in out and "HS+ not measured at finetune" in out
