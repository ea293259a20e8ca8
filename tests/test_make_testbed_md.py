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


def test_second_model_section_shows_the_start_and_the_tables_and_says_which_prompts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    assert "`sweeps/testbed-gemma3-defenses`: pending." in "\n".join(page.second_model(None))
    (tmp_path / "report.md").write_text(
        "# Sweep `testbed-gemma3-defenses`\n\nintro\n\n**HS**\n\n| defense | p = 0 |\n|---|---|\n| sft | 25.0 |\n\n"
        "**Incomplete: 2 of 8 runs finished.**\n"
    )
    (tmp_path / "report.json").write_text(json.dumps({"complete_runs": 2, "runs": 8}))
    align = {"defense": "sft", "point": "align", "method": "sft", "seed": 43, "harmful_score": 14.0}
    align |= {"over_refusal": 82.0, "p": None, "final": False}
    attacked = {**align, "point": "finetune", "harmful_score": 37.0}
    (tmp_path / "runs.json").write_text(json.dumps([align, attacked, {**align}]))
    text = "\n".join(page.second_model(tmp_path))
    assert "2 of 8 runs finished (**incomplete**" in text and "**validation** prompts" in text
    assert "| sft | 14.0 ± 0.0 | 82.0 ± 0.0 | 1 |" in text  # the aligned model once, not the attacked one
    assert "| sft | 25.0 |" in text and "**Incomplete:" not in text


def test_each_gemma_defense_is_beside_a_smollm2_run_of_the_same_config_but_the_model(monkeypatch, tmp_path):
    from ftguard.sweep.config import expand, load_sweep

    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")

    def runs(key):
        sweep, folder = load_sweep(f"sweeps/{page.SWEEPS[key]}")
        return {r.id: r.config.to_dict() for r in expand(sweep, folder, tmp_path / key)}

    gemma = runs("gemma")
    for defense, (key, name) in page.COUNTERPARTS.items():
        mine, theirs = gemma[f"{defense}/p0.1-seed43"], runs(key)[f"{name}/seed43"]
        for config in (mine, theirs):
            for field in ("name", "output_dir", "description", "model"):
                config.pop(field)
        assert mine == theirs, defense
        assert theirs["data"]["finetune"]["harmful_ratio"] == 0.1


def test_both_models_table_puts_smollm2_before_gemma_at_p_0_1(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")

    def row(defense, point, p, hs, final=True):
        return {
            "defense": defense,
            "point": point,
            "p": p,
            "final": final,
            "harmful_score": hs,
            "finetune_accuracy": 70.0,
            "over_refusal": 10.0,
            "instruction_refusal": 5.0,
        }

    smollm = tmp_path / "smollm"
    smollm.mkdir()
    (smollm / "runs.json").write_text(
        json.dumps([row("sft", "align", None, 30.0, final=False), row("sft", "finetune", 0.1, 50.0)])
    )
    gemma = [
        row("sft", "align", None, 14.0, final=False),
        row("sft", "finetune", 0.0, 25.0),
        row("sft", "finetune", 0.1, 37.0),
        row("vaccine", "finetune", 0.1, 40.0),
    ]
    lines = page.both_models(gemma, {"align_calibration": smollm})
    assert "| sft | 30.0 → 14.0 | 50.0 → 37.0 | 70.0 → 70.0 | 10.0 → 10.0 | 5.0 → 5.0 |" in lines
    assert not any(line.startswith("| vaccine") for line in lines)  # no SmolLM2 run to set beside it
    assert page.both_models(gemma, {}) == []


def test_the_hand_audits_follow_the_study_s_table_and_need_a_paired_audit(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    audits = tmp_path / "audits"
    audits.mkdir()
    assert page.hand_audits(audits) == [] and page.hand_audits(None) == []
    (audits / "level.json").write_text(json.dumps({"seed": 47, "labels": {"a": "H"}}))
    assert page.hand_audits(audits) == []  # a level audit has no paired row
    paired = {
        "defense": "lisa",
        "seed": 47,
        "n_prompts": 200,
        "codes": {"G": "", "FP": "", "C": "", "D": "", "R": ""},
        "baseline_flagged_only": {"a": "G", "b": "FP"},
        "defense_flagged_only": {"c": "N"},
    }
    (audits / "lisa.json").write_text(json.dumps(paired))
    text = "\n".join(page.hand_audits(audits))
    assert text.startswith("### What the judge adds")
    assert "| lisa | 47 | no | -0.5 | -0.5 | 1 / 1 / 0 / 0 / 0 | 1 |" in text
    assert "judged_vs_audited.png" not in text  # no plot drawn yet, none linked
    assert "What those audits could not see" not in text
    # an audit of the prompts only another judge scored differently: its genuine flips add to the first audit's
    outside = tmp_path / page.OUTSIDE
    outside.mkdir()
    other = paired | {"judge": "ftguard-cross-judge", "blind": True}
    other |= {"baseline_flagged_only": {"d": "G", "e": "G", "f": "C"}, "defense_flagged_only": {}}
    (outside / "lisa.json").write_text(json.dumps(other))
    text = "\n".join(page.hand_audits(audits))
    assert "but `ftguard-cross-judge` did not" in text
    assert "| lisa | 47 | yes | -1.5 | -1.0 | 2 / 0 / 1 / 0 / 0 | 0 |" in text
    assert "| lisa | 47 | -0.5 | -0.5 | -1.0 | -1.5 |" in text
    audit_paired = load_script("audit_paired")
    audit_paired.plot(sorted(audits.glob("*.json")), audits / page.AUDIT_PLOT)
    assert "![judged against audited](results/audits/judged_vs_audited.png)" in "\n".join(
        page.hand_audits(audits)
    )


def test_other_judges_put_each_judge_s_paired_effect_beside_the_study_judge_s_on_the_same_runs(
    tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    folder = tmp_path / "rescored"
    assert page.other_judges(None) == [] and page.other_judges(folder) == []

    def write(judge, lisa, sft_hs, agreement):
        (folder / judge).mkdir(parents=True)
        cell = {
            "diff": lisa,
            "interval": [lisa - 5, lisa + 5],
            "seeds": 2,
            "p_holm": 0.01 if lisa < -5 else 0.3,
        }
        paired = {"lisa": {"harmful_score": {"0.1": cell}}, "ewc": {"harmful_score": {}}}
        (folder / judge / "report.json").write_text(json.dumps({"tables": [{"paired": paired}]}))
        runs = [
            {"run": f"sft/seed{s}", "defense": "sft", "seed": s, "final": True, "complete": True}
            | {"harmful_score": hs}
            for s, hs in zip((46, 47), sft_hs, strict=True)
        ]
        (folder / judge / "runs.json").write_text(json.dumps(runs))
        points = [{"run": "x", "point": "finetune", "agreement": a} for a in agreement] + [{"missing": True}]
        (folder / judge / "rescore.json").write_text(json.dumps({"points": points}))

    write("keyword", -12.0, [80.0, 84.0], [70.0])
    assert page.other_judges(folder) == []  # without the study's own judge there is no same-runs reference
    write("ftguard-judge", -8.0, [40.0, 50.0], [100.0, 100.0, 99.5])
    text = "\n".join(page.other_judges(folder))
    assert text.startswith("### The same answers under other judges")
    assert (
        "2 of the 3 evaluation points of those runs got the verdicts they had" in text
        and "at seeds 46, 47;" in text
    )
    assert "| lisa | 2 | -8.0 [-13.0, -3.0] † | -12.0 [-17.0, -7.0] † |" in text
    assert "| ewc |" not in text  # no paired cell at p = 0.1
    assert "| *SFT's HS after the attack* | | 45.0 | 82.0 |" in text
    assert "ftguard-cross-judge" not in text
    write("ftguard-cross-judge", -6.0, [30.0, 36.0], [80.0])  # a fourth column and its own paragraph
    text = "\n".join(page.other_judges(folder))
    assert "| lisa | 2 | -8.0 [-13.0, -3.0] † | -12.0 [-17.0, -7.0] † | -6.0 [-11.0, -1.0] † |" in text
    assert "| *SFT's HS after the attack* | | 45.0 | 82.0 | 33.0 |" in text
    assert "`ftguard-cross-judge` hardly shares that preference" in text
    assert "‡" not in text

    # Booster judged on a later machine (added/): read seed by seed against SFT's archived runs, at the seeds
    # both have (48 has no SFT run), with Student's t over them
    for judge, booster_hs in (("ftguard-judge", [50.0, 54.0, 99.0]), ("keyword", [90.0, 90.0, 99.0])):
        (folder / judge / "added").mkdir()
        added = [
            {"run": f"booster/seed{s}", "defense": "booster", "seed": s, "final": True, "complete": True}
            | {"p": 0.1, "harmful_score": hs}
            for s, hs in zip((46, 47, 48), booster_hs, strict=True)
        ]
        (folder / judge / "added" / "runs.json").write_text(json.dumps(added))
        points = [{"run": "runs/booster/seed46", "point": "finetune", "agreement": 100.0}]
        (folder / judge / "added" / "rescore.json").write_text(json.dumps({"points": points}))
    for judge in ("ftguard-judge", "keyword", "ftguard-cross-judge"):  # the archived SFT runs carry their p
        runs = json.loads((folder / judge / "runs.json").read_text())
        (folder / judge / "runs.json").write_text(json.dumps([r | {"p": 0.1} for r in runs]))
    text = "\n".join(page.other_judges(folder))
    t = 12.706  # Student's t(0.975) with 1 degree of freedom
    # differences 10 and 4 (standard error 3), 10 and 6 (standard error 2)
    ours, words = (
        f"+7.0 [{7 - 3 * t:+.1f}, {7 + 3 * t:+.1f}] ‡",
        f"+8.0 [{8 - 2 * t:+.1f}, {8 + 2 * t:+.1f}] ‡",
    )
    assert f"| booster | 2 | {ours} | {words} | – |" in text
    assert "3 of the 4 evaluation points" in text and "at seeds 46, 47, 48;" in text
    assert "‡ Runs made and judged on a later machine, which no longer held SFT's answers" in text


def test_the_study_effect_is_scaled_by_the_share_of_the_judged_fall_each_audit_kept(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    codes = {"G": "", "FP": "", "C": "", "D": "", "R": ""}
    paths = []
    # judged −2.0 and −4.0 (4 and 8 of 200 prompts flagged for SFT only), audited −1.0 and −3.0 (2 and 6 genuine)
    for seed, genuine, fp in ((46, 2, 2), (47, 6, 2)):
        base = {f"g{i}": "G" for i in range(genuine)} | {f"f{i}": "FP" for i in range(fp)}
        audit = {"defense": "lisa", "seed": seed, "n_prompts": 200, "codes": codes}
        path = tmp_path / f"lisa-{seed}.json"
        path.write_text(json.dumps(audit | {"baseline_flagged_only": base, "defense_flagged_only": {}}))
        paths.append(path)
    cell = {"diff": -10.0, "interval": [-15.0, -5.0], "detectable": 7.0}
    study = {"tables": [{"paired": {"lisa": {"harmful_score": {"0.1": cell}}}}]}
    text = "\n".join(page.at_audited_shares(paths, study))
    assert "| lisa | -10.0 [-15.0, -5.0] | 50% (seed 46), 75% (seed 47) | -7.5 to -5.0 | 7.0 |" in text
    # the seed-46 audit of the prompts judged alike found 2 more genuine flips (-1.0): 100% of the judged fall
    outside = tmp_path / "outside-lisa-46.json"
    extra = {"g8": "G", "g9": "G", "x": "C"}
    outside.write_text(
        json.dumps(audit | {"seed": 46, "baseline_flagged_only": extra, "defense_flagged_only": {}})
    )
    text = "\n".join(page.at_audited_shares(paths, study, [outside]))
    assert "| lisa | -10.0 [-15.0, -5.0] | 100% (seed 46), 75% (seed 47) | -10.0 to -7.5 | 7.0 |" in text
    assert page.at_audited_shares(paths, None) == []


def test_the_aligned_models_hs_under_every_rescoring_judge_counts_each_model_once(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    folder = tmp_path / "rescored"
    assert page.aligned_under_judges(None) == []

    def write(judge, sft_hs, vaccine_hs):
        (folder / judge).mkdir(parents=True)
        runs = []
        for seed, sft, vaccine in zip((46, 47), sft_hs, vaccine_hs, strict=True):
            # two runs (sft, lisa) share SFT's aligned model: its HS must count once per seed
            for defense in ("sft", "lisa"):
                runs.append(
                    {"defense": defense, "method": "sft", "seed": seed, "point": "align"}
                    | {"harmful_score": sft}
                )
            runs.append(
                {
                    "defense": "vaccine",
                    "method": "vaccine",
                    "seed": seed,
                    "point": "align",
                    "harmful_score": vaccine,
                }
            )
            runs.append(
                {"defense": "sft", "method": "sft", "seed": seed, "point": "finetune", "harmful_score": 90.0}
            )
        (folder / judge / "runs.json").write_text(json.dumps(runs))

    write("keyword", [60.0, 70.0], [50.0, 50.0])
    assert page.aligned_under_judges(folder) == []  # the study's judge is the reference column
    write("ftguard-judge", [30.0, 40.0], [20.0, 30.0])
    write("ftguard-cross-judge", [18.0, 22.0], [10.0, 10.0])
    text = "\n".join(page.aligned_under_judges(folder))
    assert "| alignment | seeds | `ftguard-judge` | `keyword` | `ftguard-cross-judge` |" in text
    sd = 7.1  # the sample std of 30 and 40
    assert f"| sft | 2 | 35.0 ± {sd} | 65.0 ± {sd} | 20.0 ± 2.8 |" in text
    assert f"| vaccine | 2 | 25.0 ± {sd} | 50.0 ± 0.0 | 10.0 ± 0.0 |" in text
    assert "90.0" not in text  # after-the-attack points are not starts


def test_a_sweep_figure_is_linked_from_its_archive_only_when_the_archive_holds_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    study = tmp_path / "testbed-study"
    study.mkdir()
    assert page.figure(None, "study", "paired_effects.png", "effects") == []
    assert page.figure(study, "study", "paired_effects.png", "effects") == []
    (study / "paired_effects.png").write_bytes(b"png")
    assert page.figure(study, "study", "paired_effects.png", "effects") == [
        "![effects](results/testbed-study/paired_effects.png)",
        "",
    ]
