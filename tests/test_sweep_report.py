"""Sweep aggregation and reports on synthetic runs: mean/std, paired effects and Holm, worst case and its
guard, the attack curve, RESULTS.md."""

from __future__ import annotations

import dataclasses
import json
import statistics

import numpy as np
import pytest

from ftguard import cli
from ftguard.schema import ConfigError
from ftguard.sweep.config import expand
from ftguard.sweep.report import summarize, worst_case
from script_module import load_script
from sweep_helpers import fake_runs, tiny_sweep, unit_folders


def test_summary_mean_std_over_seeds_and_per_seed_average(tmp_path):
    sweep = tiny_sweep(defenses={"sft": {}, "booster": {}}, grid={"data.finetune.harmful_ratio": [0.0, 0.1]})
    hs = {("sft", 0.0, 1): 10.0, ("sft", 0.0, 2): 20.0, ("sft", 0.1, 1): 50.0, ("sft", 0.1, 2): 70.0}
    hs |= {("booster", 0.0, 1): 1.0, ("booster", 0.1, 1): 3.0}
    from ftguard.sweep.report import collect

    runs = fake_runs(tmp_path, sweep, {(d, p, s, None): (v, 90.0) for (d, p, s), v in hs.items()})
    (table,) = summarize(collect(runs), sweep)
    sft = table["defenses"]["sft"]["harmful_score"]
    assert sft["0.1"]["mean"] == 60.0 and sft["0.1"]["std"] == pytest.approx(statistics.stdev([50, 70]))
    # average per seed over the ratios (30, 45), then mean ± std over seeds
    assert sft["avg"]["values"] == [30.0, 45.0] and sft["avg"]["std"] == pytest.approx(
        statistics.stdev([30, 45])
    )
    booster = table["defenses"]["booster"]["harmful_score"]
    assert booster["avg"]["mean"] == 2.0 and booster["avg"]["std"] is None  # one seed: no std
    assert table["ratios"] == [0.0, 0.1]


def test_defenses_are_marked_against_the_baseline_from_counts_pooled_over_shared_seeds(tmp_path):
    from ftguard.evaluation.stats import difference_interval
    from ftguard.sweep.report import collect, markdown

    sweep = tiny_sweep(
        defenses={"sft": {}, "a": {}, "b": {}},
        grid={"data.finetune.harmful_ratio": [0.0, 0.1]},
        seeds=[1, 2, 3],
        baseline="sft",
    )
    hs = {"sft": [80, 82, 78], "a": [40, 45, 35], "b": [78, 80, 84]}  # at p = 0.1; p = 0: all 10
    values = {(d, 0.1, seed + 1, None): (float(v[seed]), 90.0) for d, v in hs.items() for seed in range(3)}
    values |= {(d, 0.0, seed, None): (10.0, 90.0) for d in hs for seed in (1, 2, 3)}
    values[("a", 0.1, 4, None)] = (0.0, 90.0)  # a seed the baseline lacks: left out of the pooling
    (table,) = summarize(collect(fake_runs(tmp_path, sweep, values)), sweep)
    a, b = (table["versus"][d]["harmful_score"] for d in ("a", "b"))
    assert a["0.1"]["seeds"] == 3 and a["0.1"]["diff"] == pytest.approx(40.0 - 80.0)
    assert a["0.1"]["interval"] == pytest.approx(list(difference_interval(120, 300, 240, 300)))
    assert a["0.1"]["mark"] == "↓" and b["0.1"]["mark"] == "≈" and a["0"]["mark"] == "≈"
    assert a["avg"]["interval"] == pytest.approx(list(difference_interval(150, 600, 270, 600)))
    assert "sft" not in table["versus"]
    assert table["versus"]["a"]["finetune_accuracy"]["0.1"]["mark"] == "≈"  # same FA: 0 difference
    text = markdown(sweep, [table], [], "keyword")
    (row,) = [line for line in text.splitlines() if line.startswith("| a |")][:1]
    assert "↓" in row and "below / above `sft`" in text


def test_paired_effects_resample_the_same_prompts_and_seeds_of_both_arms(tmp_path):
    from ftguard.evaluation.paired import paired_bootstrap
    from ftguard.sweep.aggregate import aggregate
    from ftguard.sweep.report import markdown

    sweep = tiny_sweep(
        defenses={"sft": {}, "a": {}},
        grid={"data.finetune.harmful_ratio": [0.1]},
        seeds=[1, 2, 3],
        baseline="sft",
    )
    bits = {
        ("sft", 1): "1111100000",
        ("sft", 2): "1111110000",
        ("sft", 3): "1111111000",
        ("a", 1): "1100000000",
        ("a", 2): "1110000000",
        ("a", 3): "1000000000",
    }
    runs = fake_runs(tmp_path, sweep, {(d, 0.1, seed, None): (50.0, 90.0) for d, seed in bits})
    for run in runs:
        path = run.config.out_dir / "results.json"
        results = json.loads(path.read_text())
        # seed 3 of "a" was evaluated on other prompts: it must not be paired
        items = "other" if (run.defense, run.seed) == ("a", 3) else "same"
        results["stages"]["finetune"]["outcomes"] = {
            "harmful_score": {"items": items, "bits": bits[(run.defense, run.seed)]}
        }
        path.write_text(json.dumps(results))
    rows, report = aggregate(sweep, runs)
    (table,) = report["tables"]
    cell = table["paired"]["a"]["harmful_score"]["0.1"]
    as_bool = {k: [c == "1" for c in v] for k, v in bits.items()}
    expected = paired_bootstrap(
        [as_bool[("a", 1)], as_bool[("a", 2)]], [as_bool[("sft", 1)], as_bool[("sft", 2)]]
    )
    assert {k: v for k, v in cell.items() if k not in ("p_holm", "seed_t")} == expected
    assert cell["diff"] == pytest.approx(100 * (5 - 11) / 20) and cell["seeds"] == 2
    assert cell["p_holm"] == expected["p"]  # a family of one defense: nothing to correct for
    # the seeds as the only replication: seed 1 differs by (2 - 5)/10, seed 2 by (3 - 6)/10: no spread, t infinite
    assert cell["seed_t"]["diff"] == pytest.approx(-30.0) and cell["seed_t"]["df"] == 1
    assert (
        cell["seed_t"]["se"] == pytest.approx(0.0) and cell["seed_t"]["p"] == 0.0 == cell["seed_t"]["p_holm"]
    )
    assert "finetune_accuracy" not in table["paired"]["a"] or not table["paired"]["a"]["finetune_accuracy"]
    assert all("outcomes" not in row for row in rows)  # runs.json / runs.csv stay small
    text = markdown(sweep, [table], [], "keyword")
    assert "Paired effects against `sft`" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("| a | -30.0 [")]
    assert line.endswith("| 2 |")


def test_a_baseline_that_is_not_a_defense_fails_with_the_key():
    with pytest.raises(ConfigError, match="baseline"):
        tiny_sweep(defenses={"sft": {}}, baseline="vaccine")


def test_worst_case_takes_the_highest_hs_among_settings_the_guard_keeps(tmp_path):
    sweep = tiny_sweep(
        defenses={"booster": {}},
        attack={
            "grid": {"finetune.train.learning_rate": [1e-5, 1e-4, 1e-3]},
            "capability_guard": {"max_fa_drop": 10},
        },
    )
    values = {
        ("booster", 0.1, 1, 1e-5): (5.0, 90.0),
        ("booster", 0.1, 2, 1e-5): (7.0, 92.0),
        ("booster", 0.1, 1, 1e-4): (30.0, 85.0),
        ("booster", 0.1, 2, 1e-4): (34.0, 83.0),
        # the highest HS, but the task is wrecked (FA 20 points below the best): not a credible attack
        ("booster", 0.1, 1, 1e-3): (80.0, 70.0),
        ("booster", 0.1, 2, 1e-3): (82.0, 72.0),
    }
    from ftguard.sweep.report import collect

    (entry,) = worst_case(collect(fake_runs(tmp_path, sweep, values)), sweep)
    assert entry["worst"]["setting"] == {"finetune.train.learning_rate": 1e-4}
    assert entry["worst"]["hs"] == 32.0 and entry["worst"]["fa"] == 84.0
    assert entry["kept"] == 2 and entry["total"] == 3
    dropped = [s for s in entry["settings"] if not s["kept"]]
    assert len(dropped) == 1 and "below the best 91.0" in dropped[0]["dropped_because"]
    # without the guard the wrecking setting is the worst case
    sweep.attack.capability_guard.max_fa_drop = None
    (tmp_path / "b").mkdir()
    (entry,) = worst_case(collect(fake_runs(tmp_path / "b", sweep, values)), sweep)
    assert entry["worst"]["hs"] == 81.0


def test_a_guard_relative_to_the_first_setting_never_lowers_the_worst_case_when_an_attack_is_added(tmp_path):
    from ftguard.sweep.report import collect

    lrs = [1e-5, 1e-4, 1e-3]
    # (hs, fa) per lr at one seed: the last setting, added to the suite later, trains the task best
    first_two = {("lisa", 0.1, 1, 1e-5): (20.0, 80.0), ("lisa", 0.1, 1, 1e-4): (40.0, 75.0)}
    all_three = first_two | {("lisa", 0.1, 1, 1e-3): (30.0, 90.0)}

    def entry(relative_to, values, folder):
        sweep = tiny_sweep(
            defenses={"lisa": {}},
            attack={
                "grid": {"finetune.train.learning_rate": lrs},
                "capability_guard": {"max_fa_drop": 10, "relative_to": relative_to},
            },
        )
        (tmp_path / folder).mkdir()
        (e,) = worst_case(collect(fake_runs(tmp_path / folder, sweep, values)), sweep)
        return e

    # measured from the best FA, the added setting raises the bar past lr 1e-4 (FA 75 < 90 - 10): the worst case
    # falls from 40 to 30 though the attacker only gained an option
    assert entry("best", first_two, "b2")["worst"]["hs"] == 40.0
    grown = entry("best", all_three, "b3")
    assert grown["worst"]["hs"] == 30.0 and grown["guard_reference"]["fa"] == 90.0
    assert "15.0 below the best 90.0" in grown["settings"][1]["dropped_because"]
    # measured from the first setting (FA 80), each verdict is the setting's own: nothing earlier is dropped
    for values, folder in ((first_two, "f2"), (all_three, "f3")):
        e = entry("first", values, folder)
        assert e["worst"]["hs"] == 40.0 and e["kept"] == len(values)
        assert e["guard_reference"] == {
            "rule": "first",
            "setting": {"finetune.train.learning_rate": 1e-5},
            "fa": 80.0,
        }
    # a setting 10.5 points below the first is dropped, naming its reference
    e = entry("first", first_two | {("lisa", 0.1, 1, 1e-3): (90.0, 69.5)}, "f-drop")
    assert e["worst"]["hs"] == 40.0
    assert e["settings"][2]["dropped_because"] == "FA 69.5 is 10.5 below the first setting's 80.0"
    # without the first setting measured the drop cannot be measured: nothing is kept by the guard
    e = entry("first", {k: v for k, v in all_three.items() if k[3] != 1e-5}, "f-missing")
    assert e["worst"] is None and all("not measured yet" in s["dropped_because"] for s in e["settings"])


def test_worst_case_intervals_and_the_paired_difference_cover_only_the_attacks_both_defenses_were_tried_with(
    tmp_path,
):
    from ftguard.evaluation.paired import items_digest, worst_case_bootstrap
    from ftguard.sweep.report import collect

    lrs = [1e-5, 1e-4, 1e-3]
    sweep = tiny_sweep(
        defenses={"sft": {}, "lisa": {}},
        attack={"grid": {"finetune.train.learning_rate": lrs}},
        seeds=[1, 2],
        baseline="sft",
    )
    rng = np.random.default_rng(0)
    # lisa has not been tried with lr 1e-3 yet, where SFT is at its worst
    chance = {
        ("sft", 1e-5): 0.3,
        ("sft", 1e-4): 0.4,
        ("sft", 1e-3): 0.9,
        ("lisa", 1e-5): 0.2,
        ("lisa", 1e-4): 0.3,
    }
    bits = {
        (d, seed, lr): [bool(x) for x in rng.random(40) < q]
        for (d, lr), q in chance.items()
        for seed in (1, 2)
    }
    values = {(d, 0.1, seed, lr): (100.0 * sum(b) / 40, 90.0) for (d, seed, lr), b in bits.items()}
    runs = fake_runs(tmp_path, sweep, values)
    items = items_digest([f"p{i}" for i in range(40)])
    for run in runs:
        key = (run.defense, run.seed, run.attack["finetune.train.learning_rate"])
        path = run.config.out_dir / "results.json"
        results = json.loads(path.read_text())
        outcome = {"items": items, "bits": "".join("1" if b else "0" for b in bits[key])}
        results["stages"]["finetune"]["outcomes"] = {"harmful_score": outcome}
        path.write_text(json.dumps(results))
    entries = {e["defense"]: e for e in worst_case(collect(runs), sweep)}

    def arm(defense, settings):
        return [([bits[(defense, s, lr)] for s in (1, 2)], None) for lr in settings]

    sft, lisa = entries["sft"], entries["lisa"]
    assert sft["worst"]["setting"] == {"finetune.train.learning_rate": 1e-3}
    own = worst_case_bootstrap(arm("sft", lrs))
    assert sft["uncertainty"]["interval"] == own["interval"] and "versus_baseline" not in sft["uncertainty"]
    assert sft["worst"]["hs"] == pytest.approx(own["hs"])
    # against SFT over lr 1e-5 and 1e-4 only: SFT's lr-1e-3 run is not a fair comparison for an untried attack
    paired = worst_case_bootstrap(arm("lisa", lrs[:2]), arm("sft", lrs[:2]))
    versus = lisa["uncertainty"]["versus_baseline"]
    assert versus["diff"] == pytest.approx(paired["versus_baseline"]["diff"])
    assert versus["interval"] == paired["versus_baseline"]["interval"]
    assert versus["baseline_hs"] < sft["worst"]["hs"] and (
        versus["settings"],
        versus["baseline_settings"],
    ) == (2, 2)
    assert versus["p_holm"] == versus["p"]  # one defense against the baseline: nothing to correct for
    assert versus["seed_t"]["df"] == 1 and versus["seed_t"]["p_holm"] == versus["seed_t"]["p"]
    # under the attacker's first setting (lr 1e-5) alone, and what the worst case takes of that effect
    usual = 100.0 * (
        np.mean(bits[("lisa", 1, 1e-5)] + bits[("lisa", 2, 1e-5)])
        - np.mean(bits[("sft", 1, 1e-5)] + bits[("sft", 2, 1e-5)])
    )
    assert versus["reference"]["diff"] == pytest.approx(usual)
    assert versus["erosion"]["diff"] == pytest.approx(versus["diff"] - usual)
    # a run without per-prompt outcomes: no interval rather than one over fewer runs
    path = runs[0].config.out_dir / "results.json"
    results = json.loads(path.read_text())
    del results["stages"]["finetune"]["outcomes"]
    path.write_text(json.dumps(results))
    entries = {e["defense"]: e for e in worst_case(collect(runs), sweep)}
    assert entries[runs[0].defense]["uncertainty"] is None


def test_worst_case_over_the_attack_suite_counts_the_hs_asked_through_the_trigger(tmp_path):
    suite = [{"name": "harmful_mix"}, {"name": "jailbreak_tuning", "args": {"template": "skeleton"}}]
    sweep = tiny_sweep(defenses={"lisa": {}}, attack={"grid": {"data.finetune.attack": suite}})
    # (plain HS, FA, HS through the template) per seed; the placeholder "lr" picks the attack
    values = {("lisa", 0.1, 1, 0): (40.0, 90.0), ("lisa", 0.1, 2, 0): (44.0, 90.0)}
    values |= {("lisa", 0.1, 1, 1): (30.0, 88.0), ("lisa", 0.1, 2, 1): (34.0, 88.0)}
    triggered = {1: 70.0, 2: 60.0}
    runs = []
    for run in fake_runs(tmp_path, sweep, values):
        attack = suite[int(run.attack["finetune.train.learning_rate"])]
        if attack["name"] == "jailbreak_tuning":
            path = run.config.out_dir / "results.json"
            results = json.loads(path.read_text())
            results["stages"]["finetune"]["harmful_score_triggered"] = triggered[run.seed]
            path.write_text(json.dumps(results))
        runs.append(dataclasses.replace(run, attack={"data.finetune.attack": attack}))
    from ftguard.sweep.report import collect

    (entry,) = worst_case(collect(runs), sweep)
    by_attack = {s["setting"]["data.finetune.attack"]: s["hs"] for s in entry["settings"]}
    # plain HS is lower under the template attack (32 against 42), through the template it is 65: the worst case
    assert by_attack == {"harmful_mix": 42.0, "jailbreak_tuning-template=skeleton": 65.0}
    assert entry["worst"]["setting"] == {"data.finetune.attack": "jailbreak_tuning-template=skeleton"}


@pytest.mark.slow
def test_packaged_adaptive_sweep_reports_the_worst_case_per_defense(tmp_path, capsys):
    out = tmp_path / "adaptive"
    assert cli.main(["sweep", "sweeps/adaptive-tiny", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["runs"] == 2 * 2 * 2
    worst = {e["defense"]: e for e in report["worst_case"]}
    assert set(worst) == {"sft", "vaccine"}
    for entry in worst.values():
        assert entry["total"] == 4 and 1 <= entry["kept"] <= 4
        kept = [s for s in entry["settings"] if s["kept"]]
        assert entry["worst"]["hs"] == max(s["hs"] for s in kept)
    # the attack only changes the fine-tune: one aligned model per defense serves all four attack settings
    assert len(unit_folders(out, "align")) == 2
    assert "Adaptive attack: worst case" in (out / "report.md").read_text()


def test_the_attack_curve_lists_every_setting_in_grid_order_with_means_at_each_p(tmp_path):
    from ftguard.sweep.aggregate import attack_curve
    from ftguard.sweep.report import collect, write_report

    # declared strongest first: the curve keeps the grid's order, not a sorted one
    sweep = tiny_sweep(
        defenses={"sft": {}},
        grid={"data.finetune.harmful_ratio": [0.0, 0.1]},
        seeds=[1, 2],
        attack={"grid": {"finetune.train.learning_rate": [1e-3, 1e-5]}},
    )
    hs = {
        (0.0, 1e-3): (10.0, 20.0),
        (0.1, 1e-3): (60.0, 80.0),
        (0.0, 1e-5): (2.0, 4.0),
        (0.1, 1e-5): (6.0, 8.0),
    }
    values = {
        ("sft", p, seed, lr): (pair[seed - 1], 90.0 - seed) for (p, lr), pair in hs.items() for seed in (1, 2)
    }
    runs = fake_runs(tmp_path, sweep, values)
    curve = attack_curve(collect(runs), sweep)
    assert [e["setting"] for e in curve] == [
        {"finetune.train.learning_rate": 1e-3},
        {"finetune.train.learning_rate": 1e-5},
    ]
    strong, weak = curve
    assert strong["points"]["0.1"]["harmful_score"] == 70.0 and strong["points"]["0"]["harmful_score"] == 15.0
    assert weak["points"]["0.1"]["finetune_accuracy"] == 88.5 and weak["seeds"] == 2
    assert weak["points"]["0"]["degenerate_rate"] is None  # the fake results carry no degenerate rate
    out = tmp_path / "report"
    out.mkdir()
    report = write_report(sweep, runs, out)
    text = (out / "report.md").read_text()
    assert "## Attack curve" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| sft | lr = 0.001 |")]
    assert "15.0 / 70.0" in row
    assert (out / "attack_curve.png").stat().st_size > 0 and "attack_curve.png" in report["plots"]


def test_a_sweep_without_an_attack_grid_has_no_curve(tmp_path):
    from ftguard.sweep.aggregate import attack_curve
    from ftguard.sweep.report import collect

    sweep = tiny_sweep(defenses={"sft": {}}, grid={"data.finetune.harmful_ratio": [0.1]})
    runs = fake_runs(tmp_path, sweep, {("sft", 0.1, 1, None): (50.0, 90.0)})
    assert attack_curve(collect(runs), sweep) == []


@pytest.mark.parametrize("complete", [True, False])
def test_results_md_states_status_wall_time_and_verdicts_in_words(tmp_path, capsys, complete):
    from ftguard.sweep.report import write_report

    sweep = tiny_sweep(
        defenses={"sft": {}, "a": {}},
        grid={"data.finetune.harmful_ratio": [0.0, 0.1]},
        seeds=[1, 2],
        baseline="sft",
    )
    values = {("sft", p, s, None): (80.0, 90.0) for p in (0.0, 0.1) for s in (1, 2)}
    values |= {("a", p, s, None): (20.0, 90.0) for p in (0.0, 0.1) for s in (1, 2)}
    runs = fake_runs(tmp_path, sweep, values)
    if not complete:
        (runs[-1].config.out_dir / "results.json").unlink()
    out = tmp_path / "sweep"
    out.mkdir()
    write_report(sweep, runs, out)
    finished = runs if complete else runs[:-1]
    index = {r.id: {"status": "complete", "wall_time_s": 1800.0} for r in finished}
    (out / "sweep.json").write_text(json.dumps({"name": "t", "runs": index}))

    load_script("make_results_md").main(str(out))
    text = capsys.readouterr().out
    assert f"**Status:** {len(finished)} of 8 runs complete. Wall time: {len(finished) * 0.5:.1f} h" in text
    assert text.count("| sft |") == 4  # HS, HS+, FA and over-refusal tables
    (verdict,) = [line for line in text.splitlines() if line.startswith("- **a**")]
    assert (
        verdict.startswith("- **a** (2 seeds): HS lower than SFT (-60.0 points")
        and "FA indistinguishable" in verdict
    )
    assert ("**Preliminary:**" in text) is not complete


def test_the_report_shows_hs_plus_and_leaves_out_a_metric_no_run_measured(tmp_path):
    from ftguard.sweep.report import collect, markdown

    sweep = tiny_sweep(defenses={"sft": {}}, grid={"data.finetune.harmful_ratio": [0.0]})
    runs = fake_runs(tmp_path, sweep, {("sft", 0.0, 1, None): (10.0, 90.0)})
    assert "**HS+**" in markdown(sweep, summarize(collect(runs), sweep), [], "keyword")
    results = runs[0].config.out_dir / "results.json"
    data = json.loads(results.read_text())
    del data["stages"]["finetune"]["harmful_score_plus"]  # results written before HS+ existed
    results.write_text(json.dumps(data))
    text = markdown(sweep, summarize(collect(runs), sweep), [], "keyword")
    assert "**HS+**" not in text and "**HS**" in text and "**FA**" in text


def test_results_md_appends_the_attack_probe_per_setting_marked_against_sft(tmp_path, capsys):
    from ftguard.sweep.report import write_report

    main = tiny_sweep(defenses={"sft": {}}, grid={"data.finetune.harmful_ratio": [0.0, 0.1]}, seeds=[1])
    main_out = tmp_path / "main"
    main_out.mkdir()
    write_report(
        main, fake_runs(tmp_path, main, {("sft", p, 1, None): (50.0, 80.0) for p in (0.0, 0.1)}), main_out
    )
    (main_out / "sweep.json").write_text(json.dumps({"name": "t", "runs": {}}))

    probe = tiny_sweep(
        defenses={"sft": {}, "vaccine": {}},
        grid={"data.finetune.harmful_ratio": [0.0, 0.1]},
        seeds=[1],
        baseline="sft",
        attack={
            "grid": {"finetune.train.learning_rate": [2e-4, 5e-4]},
            "capability_guard": {"max_fa_drop": 20},
        },
    )
    hs = {("sft", 2e-4): 40.0, ("vaccine", 2e-4): 10.0, ("sft", 5e-4): 80.0, ("vaccine", 5e-4): 78.0}
    values = {(d, p, 1, lr): (v + 10 * p, 80.0) for (d, lr), v in hs.items() for p in (0.0, 0.1)}
    probe_out = tmp_path / "probe"
    probe_out.mkdir()
    write_report(probe, fake_runs(tmp_path, probe, values), probe_out)

    load_script("make_results_md").main(str(main_out), str(probe_out))
    text = capsys.readouterr().out.split("## Attack strength", 1)[1]
    assert text.startswith(": a probe (1 seed)") and "**Status:** 8 of 8 runs complete" in text
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| vaccine |")}
    # 30 of 100 fewer harmful answers under the milder attack: a difference the pooled interval resolves
    assert rows["lr 0.0002"].split(" | ")[2] == "10.0↓ / 11.0↓"
    assert rows["lr 0.0005"].split(" | ")[2] == "78.0≈ / 79.0≈"
    assert "| sft | lr 0.0002 | 40.0 / 41.0 |" in text
    assert (
        "- lr 0.0002: SFT's HS 40.0 at p = 0, 41.0 at p = 0.1; HS lower than SFT: vaccine (p = 0), "
        "vaccine (p = 0.1); higher: none." in text
    )
    assert "### Adaptive attack: worst case" in text


def test_results_md_reports_each_alignment_before_the_attack_once_per_seed():
    def row(method, seed, hs, point="align"):
        return {"point": point, "method": method, "seed": seed, "harmful_score": hs, "over_refusal": 90.0}

    # three runs (p = 0, 0.1, 0.2) share each SFT aligned model: it counts once per seed
    rows = [row("sft", seed, hs) for seed, hs in ((1, 10.0), (2, 20.0)) for _ in range(3)]
    rows += [row("vaccine", 1, 5.0), row("sft", 1, 80.0, point="finetune")]
    text = load_script("make_results_md").before_attack(rows)
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    # HS and OR are all these rows have: a rate no alignment was evaluated on gets no column
    assert lines["| sft"] == f"| sft | 15.0 ± {statistics.stdev([10, 20]):.1f} | 90.0 ± 0.0 | 2 |"
    assert lines["| vaccine"] == "| vaccine | 5.0 ± 0.0 | 90.0 ± 0.0 | 1 |"
    assert "| alignment | HS | OR | seeds |" in text
    assert load_script("make_results_md").before_attack([row("sft", 1, 80.0, point="finetune")]) == ""


def test_the_report_says_which_precision_the_runs_were_trained_in_and_flags_a_mix(tmp_path):
    from ftguard.sweep.aggregate import aggregate
    from ftguard.sweep.report import markdown

    sweep = tiny_sweep(defenses={"sft": {}}, grid={"data.finetune.harmful_ratio": [0.0]}, seeds=[1, 2, 3])
    runs = fake_runs(tmp_path, sweep, {("sft", 0.0, s, None): (10.0, 90.0) for s in (1, 2, 3)})

    def trained_in(run, *precisions):
        results = run.config.out_dir / "results.json"
        data = json.loads(results.read_text())
        data["trained"] = {f"unit{i}": {"precision": p} for i, p in enumerate(precisions)}
        results.write_text(json.dumps(data))

    def report_text():
        _, report = aggregate(sweep, runs)
        return report["train_precisions"], markdown(
            sweep, report["tables"], [], "keyword", train_precisions=report["train_precisions"]
        )

    # the third run was written before results.json recorded it: not evidence of a mix
    trained_in(runs[0], "float32 + bfloat16 autocast", "float32 + bfloat16 autocast")
    trained_in(runs[1], "float32 + bfloat16 autocast")
    counts, text = report_text()
    assert counts == {"float32 + bfloat16 autocast": 2, "not recorded": 1}
    assert "Trained in: float32 + bfloat16 autocast (2 runs); not recorded (1 run)." in text
    assert "Mixed training precision" not in text
    # resumed on a CPU without native bf16: its unit trained in fp32 beside the bf16-autocast aligned model
    trained_in(runs[2], "float32", "float32 + bfloat16 autocast")
    counts, text = report_text()
    assert counts == {"float32 + bfloat16 autocast": 2, "float32 and float32 + bfloat16 autocast": 1}
    assert "**Mixed training precision** (float32 + bfloat16 autocast (2 runs);" in text
    # every run mixing within itself (aligned on one CPU, fine-tuned on another) is flagged too
    for run in runs:
        trained_in(run, "float32", "float32 + bfloat16 autocast")
    counts, text = report_text()
    assert counts == {"float32 and float32 + bfloat16 autocast": 3} and "**Mixed training precision**" in text


def test_the_report_says_what_the_units_were_made_on_and_flags_a_study_resumed_on_another_cpu(tmp_path):
    from ftguard.sweep.aggregate import aggregate
    from ftguard.sweep.report import markdown

    sweep = tiny_sweep(defenses={"sft": {}}, grid={"data.finetune.harmful_ratio": [0.0]}, seeds=[1, 2, 3])
    runs = fake_runs(tmp_path, sweep, {("sft", 0.0, s, None): (10.0, 90.0) for s in (1, 2, 3)})
    intel, amd = "cpu: Intel Xeon (x86_64, AMX)", "cpu: AMD EPYC (x86_64, AVX512-BF16)"

    def made_on(run, **units):
        results = run.config.out_dir / "results.json"
        data = json.loads(results.read_text())
        data["trained"] = {key: {"hardware": where} for key, where in units.items()}
        results.write_text(json.dumps(data))

    def report_text():
        _, report = aggregate(sweep, runs)
        return report["train_hardware"], markdown(
            sweep, report["tables"], [], "keyword", train_hardware=report["train_hardware"]
        )

    counts, text = report_text()  # nothing recorded (runs written before it was): nothing said
    assert counts == {"not recorded": 3} and "Made on" not in text and "Mixed hardware" not in text
    made_on(runs[0], align=intel, finetune=intel)
    made_on(runs[1], align=intel, finetune=intel, post=intel)
    counts, text = report_text()
    assert counts == {intel: 2, "not recorded": 1}
    assert f"Made on: {intel} (2 runs); not recorded (1 run)." in text and "Mixed hardware" not in text
    # the third seed's aligned model made again on another kind of CPU, its Antidote arithmetic too
    made_on(runs[2], align=amd, finetune=intel, post=amd)
    counts, text = report_text()
    assert counts == {intel: 2, f"{amd} and {intel}": 1}
    assert f"**Mixed hardware** ({amd} and {intel} (1 run); {intel} (2 runs))" in text


def test_a_post_stage_repair_that_does_not_train_is_no_training_precision(tmp_path):
    from ftguard.sweep.aggregate import aggregate

    sweep = tiny_sweep(defenses={"sft": {}}, grid={"data.finetune.harmful_ratio": [0.0]}, seeds=[1, 2])
    runs = fake_runs(tmp_path, sweep, {("sft", 0.0, s, None): (10.0, 90.0) for s in (1, 2)})
    bf16 = "float32 + bfloat16 autocast"

    def trained(run, post):
        results = run.config.out_dir / "results.json"
        data = json.loads(results.read_text())
        data["trained"] = {"align": {"precision": bf16}, "finetune": {"precision": bf16}, "post": post}
        results.write_text(json.dumps(data))

    # Antidote's pruning on the float32 weights beside bf16-autocast training: one precision, not a mix
    trained(runs[0], {"method": "antidote", "precision": "float32", "report": {"dense_ratio": 0.1}})
    # one-shot safety trains, and its report says in what: that counts
    trained(
        runs[1], {"method": "one_shot_safety", "precision": "float32", "report": {"precision": "float32"}}
    )
    _, report = aggregate(sweep, runs)
    assert report["train_precisions"] == {bf16: 1, f"float32 and {bf16}": 1}


def test_win_rate_outcomes_pair_in_half_points_and_not_with_a_match_score():
    from ftguard.evaluation.paired import paired_bootstrap
    from ftguard.sweep.aggregate import _paired_outcomes

    def point(bits, scale=None):
        entry = {"items": "abc", "bits": bits} | ({"scale": scale} if scale else {})
        return {"outcomes": {"finetune_accuracy": entry}}

    treated, control = _paired_outcomes(point("2120", 2), point("1010", 2), "finetune_accuracy")
    assert treated == [1.0, 0.5, 1.0, 0.0] and control == [0.5, 0.0, 0.5, 0.0]
    # wins count 1, ties ½: (2.5 − 1.0) / 4 items = +37.5 points
    assert paired_bootstrap([treated], [control])["diff"] == pytest.approx(37.5)
    assert _paired_outcomes(point("1010"), point("2120", 2), "finetune_accuracy") is None


def test_paired_effects_carry_holm_over_the_defenses_of_a_column_and_mark_only_those_that_survive(tmp_path):
    from ftguard.evaluation.paired import holm
    from ftguard.sweep.aggregate import aggregate
    from ftguard.sweep.report import markdown

    # Against the same SFT, on 40 prompts × 3 seeds: "strong" halves HS, "weak" removes a few harmful answers,
    # "null" is SFT's outcomes with one flip, "uneven" falls by 45, 5 and 25 points at its three seeds.
    sft = "1" * 20 + "0" * 20
    arms = {
        "sft": sft,
        "strong": "1" * 8 + "0" * 32,
        "weak": "1" * 16 + "0" * 24,
        "null": "0" + "1" * 19 + "0" * 20,
        "uneven": {1: "1" * 2 + "0" * 38, 2: "1" * 18 + "0" * 22, 3: "1" * 10 + "0" * 30},
    }
    sweep = tiny_sweep(
        defenses={d: {} for d in arms},
        grid={"data.finetune.harmful_ratio": [0.1]},
        seeds=[1, 2, 3],
        baseline="sft",
    )
    runs = fake_runs(
        tmp_path, sweep, {(d, 0.1, seed, None): (50.0, 90.0) for d in arms for seed in (1, 2, 3)}
    )
    for run in runs:
        path = run.config.out_dir / "results.json"
        results = json.loads(path.read_text())
        results["stages"]["finetune"]["outcomes"] = {
            "harmful_score": {
                "items": "same",
                "bits": bits if isinstance(bits := arms[run.defense], str) else bits[run.seed],
            }
        }
        path.write_text(json.dumps(results))
    _, report = aggregate(sweep, runs)
    (table,) = report["tables"]
    cells = {d: table["paired"][d]["harmful_score"]["0.1"] for d in ("strong", "weak", "null", "uneven")}
    assert {d: c["p_holm"] for d, c in cells.items()} == pytest.approx(
        holm({d: c["p"] for d, c in cells.items()})
    )
    assert cells["strong"]["p_holm"] < 0.05 < cells["null"]["p_holm"]
    text = markdown(sweep, [table], [], "keyword")
    rows = {ln.split(" | ")[0][2:]: ln for ln in text.splitlines() if ln.startswith("| ") and "[" in ln}
    # strong falls by the same 30 points at every seed: Student's t over the seeds finds it too (‡)
    assert "↓‡" in rows["strong"] and "†" not in rows["null"] and "‡" not in rows["null"]
    # uneven survives Holm under the bootstrap, which redraws three seeds, but not under t over those seeds (†)
    assert cells["uneven"]["p_holm"] < 0.05 < cells["uneven"]["seed_t"]["p_holm"]
    assert "↓†" in rows["uneven"]
    t = cells["uneven"]["seed_t"]
    assert t["diff"] == pytest.approx(-25.0) and t["se"] == pytest.approx(20.0 / 3**0.5) and t["df"] == 2
    # weak: the mark follows its own Holm values, whichever way they fall
    survives = cells["weak"]["mark"] == "↓" and cells["weak"]["p_holm"] < 0.05
    assert ("↓†" in rows["weak"] or "↓‡" in rows["weak"]) == survives


def test_listed_attack_settings_follow_the_grid_s_combinations_in_run_ids_and_attack_order(tmp_path):
    sweep = tiny_sweep(
        defenses={"sft": {}},
        seeds=[1],
        attack={
            "grid": {"finetune.train.learning_rate": [1.0e-4, 2.0e-4], "adapter.finetune_full": [False]},
            "settings": [{"adapter.finetune_full": True, "finetune.train.learning_rate": 1.0e-4}],
        },
    )
    runs = expand(sweep, tmp_path, tmp_path / "out")
    assert [r.id for r in runs] == [
        "sft/lr=0.0001-full=False-seed1",
        "sft/lr=0.0002-full=False-seed1",
        "sft/lr=0.0001-full=True-seed1",  # three runs, not the 2 × 2 of a product
    ]
    assert [r.config.adapter.finetune_full for r in runs] == [False, False, True]
    assert [r.attack for r in runs][-1] == {
        "finetune.train.learning_rate": 1.0e-4,
        "adapter.finetune_full": True,
    }
    from ftguard.sweep.plan import describe, dry_run

    assert "3 runs = 1 defenses × 3 attack settings × 1 seeds" in describe(dry_run(sweep, runs))


def test_the_worst_case_table_says_whose_guard_kept_how_many_attacks():
    from ftguard.sweep.report import _versus_baseline_cell

    versus = {"diff": -16.5, "interval": [-26.0, -8.0], "p_holm": 0.2, "seeds": [44, 45], "settings": 6}
    cell = _versus_baseline_cell(versus | {"baseline_settings": 5}, "sft")
    assert cell.endswith("(6 attacks kept, sft 5; 2 seeds)")
    assert _versus_baseline_cell(versus | {"baseline_settings": 6, "seeds": [44]}, "sft").endswith(
        "sft 6; 1 seed)"
    )
    assert _versus_baseline_cell(None, "sft") == "–"


def test_the_paired_effects_figure_has_a_row_per_defense_and_names_slice_and_p_only_where_they_vary(tmp_path):
    from ftguard.sweep.plots import paired_rows, plot_paired

    def cell(diff, p_holm):
        return {"diff": diff, "interval": [diff - 3, diff + 3], "p_holm": p_holm, "seeds": 5}

    study = {
        "slice": {},
        "paired": {
            "sft-p0": {"harmful_score": {}},  # a control at another p: nothing paired, no row
            "lisa": {"harmful_score": {"0.1": cell(-12, 0.01)}, "finetune_accuracy": {"0.1": cell(-5, 0.2)}},
            "kl": {"harmful_score": {"0.1": cell(-5, 0.03)}},
            "booster": {"harmful_score": {"0.1": cell(+7, 1.0) | {"seeds": 2}}},
        },
    }
    assert [label for label, _ in paired_rows([study])] == ["lisa", "kl", "booster (2 of 5 seeds)"]
    assert paired_rows([study])[0][1]["finetune_accuracy"]["diff"] == -5
    suite = {
        "slice": {"attack.finetune.train.learning_rate": 2e-4},
        "paired": {"lisa": {"harmful_score": {"0.1": cell(-3, 0.5), "0.2": cell(-4, 0.5)}}},
    }
    assert [label for label, _ in paired_rows([suite])] == [
        "lisa, lr = 0.0002, p = 0.1",
        "lisa, lr = 0.0002, p = 0.2",
    ]
    assert plot_paired([{"slice": {}, "paired": {"sft-p0": {"harmful_score": {}}}}], tmp_path, "sft") == []
    assert not (tmp_path / "paired_effects.png").exists()
    (path,) = plot_paired([study, suite], tmp_path, "sft")
    assert path == tmp_path / "paired_effects.png" and path.stat().st_size > 1000
