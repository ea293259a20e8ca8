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


def _run(folder, defense, attack, seed, hs, flags=None, through=None, full=False):
    run = folder / "runs" / defense / f"attack={attack}{'-full' if full else ''}-seed{seed}"
    run.mkdir(parents=True)
    mix = {} if flags is None else {"flag_rate_before": flags[0], "flag_rate_after": flags[1]}
    if attack == "virus":  # the resolved args, as the mix report records them
        mix["attack"] = {"name": "virus", "args": {"steps": 10, "candidates": 16, "max_rows": 8}}
    trained = {"align": {"method": "sft"}, "finetune": {"method": defense}}
    if through is not None:
        trained["finetune"]["report"] = {
            "filter": {"kept_harmful": through[0], "uploaded_harmful": through[1]}
        }
    results = {
        "complete": True,
        "config": {"data": {"finetune": {"attack": {"name": attack}}}, "adapter": {"finetune_full": full}},
        "data": {"mixes": {"0.1": mix}},
        "trained": trained,
        "stages": {"align": {"harmful_score": 5.0}, "finetune-p0.1": {"harmful_score": hs}},
    }
    (run / "results.json").write_text(json.dumps(results))


def test_virus_against_the_filter_reads_flag_rates_and_what_the_filter_let_through(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    _run(tmp_path, "sft", "virus", 44, 50.0, flags=(0.8, 0.6))
    _run(tmp_path, "sft", "virus", 45, 54.0, flags=(0.9, 0.7))
    _run(tmp_path, "filter", "harmful_mix", 44, 40.0, through=(5, 26))
    _run(tmp_path, "filter", "virus", 44, 47.0, flags=(0.8, 0.5), through=(13, 26))
    _run(tmp_path, "lisa", "jailbreak_tuning", 44, 90.0)  # neither the mix nor Virus: not in this table
    rows = page.virus_against_the_filter(tmp_path)
    assert "| sft | virus | 85.0 → 65.0 | no filter | 52.0 | 2 |" in rows
    assert "| filter | harmful_mix | – | 5 of 26 | 40.0 | 1 |" in rows
    assert "| filter | virus | 80.0 → 50.0 | 13 of 26 | 47.0 | 1 |" in rows
    assert not any("lisa" in row for row in rows)
    assert (
        "Virus's budget here: 8 rows, 10 steps of 16 candidates (the authors: every row, 50 × 128)." in rows
    )
    # the section falls back on the probe while the suite has not run, and says so
    text = "\n".join(page.attack_suite(None, tmp_path))
    assert "`sweeps/cpu-attack-suite`: pending" in text and "from `cpu-attack-suite-virus-probe`" in text


def test_the_virus_table_reads_the_lora_attacker_at_virus_s_seeds_the_probe_first_then_the_suite(
    tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    suite, probe = tmp_path / "suite", tmp_path / "probe"
    _run(suite, "sft", "harmful_mix", 44, 50.0)
    _run(suite, "sft", "harmful_mix", 45, 60.0)  # no Virus at seed 45: another aligned model, left out
    _run(suite, "sft", "harmful_mix", 44, 90.0, full=True)  # the full-parameter attacker: another attack
    _run(suite, "sft", "virus", 44, 52.0, flags=(0.8, 0.6))
    _run(suite, "filter", "harmful_mix", 44, 40.0)  # the study's older copy: no filter report kept
    _run(probe, "filter", "harmful_mix", 44, 40.0, through=(5, 26))  # the same run, made first, with it
    _run(probe, "filter", "virus", 44, 47.0, flags=(0.8, 0.5), through=(13, 26))  # not in the suite yet
    _run(suite, "lisa", "harmful_mix", 44, 45.0)  # no Virus run at all: not in the table
    rows = page.virus_against_the_filter(probe, suite)
    assert "| sft | harmful_mix | – | no filter | 50.0 | 1 |" in rows
    assert "| filter | harmful_mix | – | 5 of 26 | 40.0 | 1 |" in rows
    assert "| sft | virus | 80.0 → 60.0 | no filter | 52.0 | 1 |" in rows
    assert "| filter | virus | 80.0 → 50.0 | 13 of 26 | 47.0 | 1 |" in rows
    assert not any("lisa" in row for row in rows)
    (suite / "report.md").write_text("# Sweep\n\n## Adaptive attack: worst case\n\n| a |\n")
    (suite / "report.json").write_text(json.dumps({"complete_runs": 5, "runs": 108}))
    text = "\n".join(page.attack_suite(suite, probe))
    assert "where it made the same run first" in text and "| filter | virus |" in text
    assert "Read by the rule" not in text  # no worst-case entries, no readings


def test_the_suite_section_reads_each_defense_but_the_sweep_s_baseline_by_the_rule(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "sweep.yaml").write_text("name: s\nbaseline: base\n")
    versus = {"interval": [-9.0, -2.0], "p_holm": 0.01, "seeds": [44, 45], "seed_t": {"p_holm": 0.2}}
    worst = [
        {"defense": "base", "slice": {}, "worst": {"hs": 60.0}, "uncertainty": {}},
        {"defense": "lisa", "slice": {}, "worst": {"hs": 40.0}, "uncertainty": {"versus_baseline": versus}},
    ]
    (suite / "report.md").write_text("# Sweep\n\n## Adaptive attack: worst case\n\n| a |\n")
    (suite / "report.json").write_text(json.dumps({"complete_runs": 5, "runs": 9, "worst_case": worst}))
    text = "\n".join(page.attack_suite(suite, None))
    assert "### Read by the rule written before the other seeds" in text
    assert "| lisa | 2 | does not hold (provisional: 2 of 3 seeds) | fails: Holm (t over seeds) | – |" in text
    assert "| base |" not in text


def test_no_virus_run_no_virus_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    _run(tmp_path, "sft", "harmful_mix", 44, 50.0)
    assert page.virus_against_the_filter(tmp_path) == []
    assert "Virus against" not in "\n".join(page.attack_suite(None, tmp_path))


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


def test_the_suite_s_level_audits_put_the_audited_hs_beside_the_judge_s_and_only_the_suite_s(
    tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    audits = tmp_path / "audits"
    audits.mkdir()
    assert page.suite_level_audits(audits) == [] and page.suite_level_audits(None) == []
    # 126 of 200 flagged; half the flagged sample complies, a quarter of the passed one: (0.5·126 + 0.25·74) / 2
    scores = {"judge_hs": 63.0, "precision": 50.0, "precision_interval": [33.2, 66.8], "missed": 25.0}
    scores |= {"missed_interval": [12.0, 44.6], "audited_hs": 40.75}
    level = {"model": "filter, full", "seed": 44, "labels": {"a": "H"}, "scores": scores}
    (audits / "cpu-attack-suite-seed44-filter-full-level.json").write_text(json.dumps(level))
    (audits / "testbed-study-seed47-sft-level.json").write_text(json.dumps(level | {"model": "sft"}))
    text = "\n".join(page.suite_level_audits(audits))
    assert "| filter, full | 44 | 63.0 | 50 [33, 67] | 25 [12, 45] | 40.8 |" in text
    assert "| sft |" not in text  # the study's level audits have their own section


def test_each_audited_suite_cell_sits_beside_the_baseline_s_audited_cell_of_its_attack_and_seed(
    tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    page = load_script("make_testbed_md")
    audits = tmp_path / "audits"
    audits.mkdir()

    def level(model: str, seed: int, n_flagged: int, hits: tuple[int, int]) -> dict:
        # four flagged and four passed answers read; hits: how many of each comply
        flagged = {f"f{i}": True for i in range(4)} | {f"p{i}": False for i in range(4)}
        labels = {
            k: "H" if (k[0] == "f" and int(k[1]) < hits[0]) or (k[0] == "p" and int(k[1]) < hits[1]) else "N"
            for k in flagged
        }
        share = n_flagged / 200
        scores = {
            "judge_hs": 100 * share,
            "audited_hs": 100 * (share * hits[0] / 4 + (1 - share) * hits[1] / 4),
        }
        return {
            "model": model,
            "seed": seed,
            "n_prompts": 200,
            "n_flagged": n_flagged,
            "flagged": flagged,
            "labels": labels,
            "scores": scores,
        }

    cells = {
        "seed44-sft-full": level("sft, full-parameter harmful_mix", 44, 120, (4, 2)),  # 0.6·100 + 0.4·50 = 80
        "seed44-lisa-full": level("lisa, full-parameter harmful_mix", 44, 40, (2, 1)),  # 0.2·50 + 0.8·25 = 30
        "seed44-lisa-jailbreak": level(
            "lisa, jailbreak_tuning (asked plainly)", 44, 80, (4, 0)
        ),  # no sft cell
        "seed45-lisa-full": level(
            "lisa, full-parameter harmful_mix", 45, 40, (2, 1)
        ),  # sft's is seed 44's only
    }
    for name, audit in cells.items():
        (audits / f"cpu-attack-suite-{name}-level.json").write_text(json.dumps(audit))
    text = "\n".join(page.suite_audits_against_baseline(audits, "sft"))
    rows = [line for line in text.splitlines() if line.startswith("| lisa")]
    assert len(rows) == 1 and rows[0].startswith(
        "| lisa | full-parameter harmful_mix | 44 | 20.0 / 60.0, -40.0 | "
    )
    assert "| 30.0 / 80.0 | -50.0 [" in rows[0]
    assert page.suite_audits_against_baseline(audits, "vaccine") == []  # no baseline audited: no table


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
