"""scripts/suite_readings.py: the attack suite's reading rule (docs/attacks.md) on worst-case entries."""

from __future__ import annotations

import json

from script_module import load_script

rule = load_script("suite_readings")


def _entry(
    defense="lisa",
    seeds=(44, 45, 46),
    interval=(-30.0, -10.0),
    p_holm=0.001,
    t_holm=0.001,
    erosion=(-20.0, -5.0),
    worst=True,
):
    versus = {
        "diff": sum(interval) / 2,
        "interval": list(interval),
        "p_holm": p_holm,
        "seeds": list(seeds),
        "erosion": {"diff": sum(erosion) / 2, "interval": list(erosion)},
    }
    if t_holm is not None:
        versus["seed_t"] = {"p": t_holm / 5, "p_holm": t_holm}
    return {
        "defense": defense,
        "slice": {},
        "seeds_compared": list(seeds),
        "worst": {"hs": 40.0} if worst else None,
        "uncertainty": {"versus_baseline": versus},
    }


def test_a_defense_holds_only_when_the_interval_and_both_holm_readings_agree():
    assert rule.reading(_entry()) == {
        "defense": "lisa",
        "seeds": 3,
        "provisional": False,
        "holds": True,
        "why": "all three hold",
        "flattered": False,
    }
    # each condition alone sinks it, and the reading names it
    for changed, named in [
        ({"interval": (-20.0, 1.0)}, "interval below 0"),
        ({"p_holm": 0.06}, "Holm (bootstrap)"),
        ({"t_holm": 0.2}, "Holm (t over seeds)"),
    ]:
        r = rule.reading(_entry(**changed))
        assert r["holds"] is False and r["why"] == f"fails: {named}", (changed, r)


def test_no_t_with_one_seed_no_worst_case_and_no_comparison_each_read_as_such():
    one = rule.reading(_entry(seeds=(44,), t_holm=None))
    assert one["holds"] is False and one["provisional"] is True
    assert one["why"] == "fails: Holm (t over seeds: needs two seeds)"
    dropped = rule.reading(_entry(worst=False))
    assert dropped["holds"] is False and "no worst case" in dropped["why"]
    pending = rule.reading({"defense": "kl", "slice": {}, "seeds_compared": [], "worst": {"hs": 1.0}})
    assert pending["holds"] is None and pending["seeds"] == 0 and pending["provisional"]


def test_the_usual_attack_flatters_a_defense_when_the_erosion_interval_lies_above_0():
    assert rule.reading(_entry(erosion=(2.0, 9.0)))["flattered"] is True
    assert rule.reading(_entry(erosion=(-1.0, 9.0)))["flattered"] is False


def test_the_baseline_and_grid_slices_are_left_out_and_the_table_marks_provisional(tmp_path, capsys):
    sliced = _entry(defense="kl") | {"slice": {"p": 0.1}}
    report = {
        "worst_case": [_entry(defense="sft"), _entry(), sliced, _entry(defense="filter", seeds=(44, 45))]
    }
    rows = rule.readings(report, "sft")
    assert [r["defense"] for r in rows] == ["lisa", "filter"]
    lines = rule.table(rows)
    assert lines[2].startswith("| lisa | 3 | **holds** |")
    assert "(provisional: 2 of 3 seeds)" in lines[3]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    rule.main([str(path)])
    assert capsys.readouterr().out.splitlines() == lines
