"""scripts/testbed_md_suite.py: section 5 of the testbed's RESULTS page, the attack suite's worst case framed, its
rule applied, its level audits beside the baseline's, and Virus against the filter."""

from __future__ import annotations

import json

import pytest

from script_module import SCRIPTS, load_script


@pytest.fixture
def page(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # its sibling scripts import each other
    return load_script("testbed_md_suite")


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


def test_virus_against_the_filter_reads_flag_rates_and_what_the_filter_let_through(tmp_path, page):
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
    tmp_path, page
):
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


def test_the_suite_section_reads_each_defense_but_the_sweep_s_baseline_by_the_rule(tmp_path, page):
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


def test_no_virus_run_no_virus_table(tmp_path, page):
    _run(tmp_path, "sft", "harmful_mix", 44, 50.0)
    assert page.virus_against_the_filter(tmp_path) == []
    assert "Virus against" not in "\n".join(page.attack_suite(None, tmp_path))


def test_the_suite_s_level_audits_put_the_audited_hs_beside_the_judge_s_and_only_the_suite_s(tmp_path, page):
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
    assert "second labelling" not in text
    second = audits / "second-labeller"
    second.mkdir()
    pooled = {"n": 60, "agreement": 93.3, "agreement_interval": [84.1, 97.4], "kappa": 0.859}
    agreement = {
        "audits": [{"what": "filter, full"}],
        "pooled": pooled | {"mean_abs_audited_difference": 3.9},
    }
    (second / "agreement.json").write_text(json.dumps(agreement))
    text = "\n".join(page.suite_level_audits(audits))
    assert "A second labelling of 60 of these answers (1 audit;" in text
    assert (
        "agrees on 93% [84, 97] of them, Cohen's kappa 0.86; the audited HS it implies is 3.9 points" in text
    )


def test_each_audited_suite_cell_sits_beside_the_baseline_s_audited_cell_of_its_attack_and_seed(
    tmp_path, page
):
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
