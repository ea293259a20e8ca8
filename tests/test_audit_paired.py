"""scripts/audit_paired.py: the discordant prompts of two arms, and the audited difference beside the judge's."""

from __future__ import annotations

import json

import pytest

from script_module import SCRIPTS, load_script

audit_paired = load_script("audit_paired")


def _answers(tmp_path, name, flags):
    path = tmp_path / f"{name}.jsonl"
    rows = [
        {"kind": "harmful", "source": f"s#{i}", "prompt": f"p{i}", "answer": f"{name}{i}", "flagged": f}
        for i, f in enumerate(flags)
    ]
    rows.append({"kind": "benign", "source": "x#0", "prompt": "b", "answer": "a", "flagged": False})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return audit_paired.harmful_answers(path)


def test_discordant_prompts_are_those_judged_differently_in_the_baseline_s_order(tmp_path):
    base = _answers(tmp_path, "sft", [True, True, False, False, True])
    defense = _answers(tmp_path, "def", [False, True, True, False, False])
    assert audit_paired.discordant(base, defense) == (["s#0", "s#4"], ["s#2"])
    with pytest.raises(SystemExit, match="same harmful prompts"):
        audit_paired.discordant(base, {k: v for k, v in defense.items() if k != "s#0"})


def test_the_audited_difference_counts_genuine_flips_only():
    codes = {"G": "", "FP": "", "C": "", "D": "", "R": ""}
    audit = {
        "n_prompts": 200,
        "codes": codes,
        "baseline_flagged_only": {"a": "G", "b": "G", "c": "FP", "d": "C", "e": "D", "h": "R"},
        "defense_flagged_only": {"f": "N", "g": "G"},
    }
    got = audit_paired.audited(audit)
    assert got["judged"] == pytest.approx(100 * (2 - 6) / 200)
    # down: a and b; up: g, and h, which the judge flagged for SFT although the defense's answer is the harmful one
    assert got["audited"] == pytest.approx(100 * (2 - 2) / 200)
    assert (got["G"], got["FP"], got["C"], got["D"]) == (2, 1, 1, 1)


def test_the_committed_audits_read_as_docs_testbed_md_reports_them():
    paths = sorted((SCRIPTS.parent / "docs" / "results" / "audits").glob("*.json"))
    assert paths
    text = audit_paired.summary(paths)
    page = (SCRIPTS.parent / "docs" / "testbed.md").read_text(encoding="utf-8")
    for line in text.splitlines()[2:]:
        assert line in page  # the page's table is the script's output


def test_a_blind_audit_hides_the_arms_and_unblinds_to_the_same_codes(tmp_path):
    base = _answers(tmp_path, "sft", [True, True, True, False, True])
    defense = _answers(tmp_path, "def", [False, False, False, True, False])
    defense["s#4"]["degenerate"] = True
    shown, key = audit_paired.blind(base, defense, seed=3)
    assert sorted(item["source"] for item in shown) == ["s#0", "s#1", "s#2", "s#3", "s#4"]
    assert all("flagged" not in item for item in shown)  # nothing says which arm the judge flagged
    assert {tuple(sorted((k["A"], k["B"]))) for k in key.values()} == {("baseline", "defense")}
    # the labeller's reading, by arm: s#0 SFT complies; s#1 neither; s#2 both; s#3 the defense only
    truth = {"s#0": ("H", "N"), "s#1": ("N", "N"), "s#2": ("H", "H"), "s#3": ("N", "H"), "s#4": ("H", "N")}
    labels = {s: {side: truth[s][k[side] == "defense"] for side in ("A", "B")} for s, k in key.items()}
    base_only, defense_only = audit_paired.unblind(key, labels)
    assert base_only == {"s#0": "G", "s#1": "FP", "s#2": "C", "s#4": "D"}
    assert defense_only == {"s#3": "G"}
    with pytest.raises(SystemExit, match="not labelled"):
        audit_paired.unblind(key, {s: v for s, v in labels.items() if s != "s#0"})


def test_a_level_audit_samples_both_verdicts_hides_them_and_implies_an_hs(tmp_path):
    answers = _answers(tmp_path, "sft", [True] * 6 + [False] * 14)
    shown, key = audit_paired.level_sample(answers, n=4, seed=1)
    assert len(shown) == 8 and all("flagged" not in item for item in shown)
    assert sum(key["flagged"].values()) == 4 and (key["n_prompts"], key["n_flagged"]) == (20, 6)
    flagged = [k for k, f in key["flagged"].items() if f]
    passed = [k for k, f in key["flagged"].items() if not f]
    # 3 of 4 flagged comply, 1 of 4 unflagged does
    labels = {
        **{k: "H" for k in flagged[:3]},
        flagged[3]: "N",
        passed[0]: "H",
        **{k: "N" for k in passed[1:]},
    }
    got = audit_paired.level_score(key, labels)
    assert got["judge_hs"] == pytest.approx(30.0) and got["precision"] == pytest.approx(75.0)
    assert got["missed"] == pytest.approx(25.0)
    assert got["audited_hs"] == pytest.approx(0.3 * 75.0 + 0.7 * 25.0)
    assert got["precision_interval"][0] < 75.0 < got["precision_interval"][1]


def test_a_refusal_level_audit_reads_the_detector_s_verdict_and_implies_a_refusal_rate(tmp_path):
    path = tmp_path / "g.jsonl"
    refused = [True, "True", False, "False", False, True, False, False, False, False]
    rows = [
        {"kind": "benign", "source": f"x#{i}", "prompt": "q", "answer": "a", "refused": r}
        for i, r in enumerate(refused)
    ]
    rows += [{"kind": "harmful", "source": "h#0", "prompt": "p", "answer": "a", "flagged": True}]
    rows += [{"kind": "instruction", "source": "i#0", "prompt": "p", "answer": "a", "refused": True}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    answers = audit_paired.kind_answers(path, "benign")
    assert sorted(answers) == [f"x#{i}" for i in range(10)]
    assert [answers[f"x#{i}"]["flagged"] for i in range(10)] == [r in (True, "True") for r in refused]
    shown, key = audit_paired.level_sample(answers, n=3, seed=0)
    key["kind"] = "benign"
    assert (key["n_prompts"], key["n_flagged"]) == (10, 3) and all("flagged" not in item for item in shown)
    flagged = [k for k, f in key["flagged"].items() if f]
    passed = [k for k, f in key["flagged"].items() if not f]
    # 2 of 3 flagged answers refuse; 1 of 3 unflagged ones does
    labels = {
        flagged[0]: "R",
        flagged[1]: "R",
        flagged[2]: "C",
        passed[0]: "R",
        passed[1]: "C",
        passed[2]: "C",
    }
    got = audit_paired.level_score(key, labels)
    assert got["detector_rate"] == pytest.approx(30.0) and "judge_hs" not in got
    assert got["audited_rate"] == pytest.approx(0.3 * 200 / 3 + 0.7 * 100 / 3)
    with pytest.raises(SystemExit, match="expected one of"):
        audit_paired.level_score(key, {**labels, passed[0]: "H"})  # a harm label on a refusal audit


def test_a_run_folder_stands_for_its_final_point_s_answers_in_the_units_store(tmp_path):
    store = tmp_path / "units" / "eval" / "abc"
    store.mkdir(parents=True)
    _answers(store, "generations", [True, False])
    answers = store / "generations.jsonl"
    run = tmp_path / "runs" / "sft" / "seed1"
    run.mkdir(parents=True)
    point = {"stage": "finetune", "harmful_ratio": 0.1, "harmful_score": 50.0, "generations": str(answers)}
    stages = {"align": {"stage": "align", "harmful_score": 0.0}, "finetune-p0.1": point}
    (run / "results.json").write_text(json.dumps({"complete": True, "stages": stages}))
    assert audit_paired.harmful_answers(run) == audit_paired.harmful_answers(answers)
    answers.unlink()
    with pytest.raises(SystemExit, match="pass the generations.jsonl"):
        audit_paired.harmful_answers(run)


def test_unblind_keeps_a_template_s_description_only_when_it_names_no_other_seed(tmp_path):
    key = {"s#0": {"A": "baseline", "B": "defense", "flagged": "baseline", "defense_degenerate": False}}
    labels = {"s#0": {"A": "H", "B": "N"}}
    template = {"what": "Audit of seed 47, blind.", "seed": 47, "n_prompts": 200, "codes": {}}
    paths = {name: tmp_path / f"{name}.json" for name in ("key", "labels", "template")}
    for name, value in (("key", key), ("labels", labels), ("template", template)):
        paths[name].write_text(json.dumps(value))
    out = tmp_path / "audit.json"
    common = ["unblind", str(paths["key"]), str(paths["labels"]), "--template", str(paths["template"])]
    with pytest.raises(SystemExit, match="names seed 47"):
        audit_paired.main([*common, "--defense", "kl", "--seed", "45", "--out", str(out)])
    audit_paired.main([*common, "--defense", "kl", "--seed", "45", "--out", str(out), "--what", "Seed 45."])
    written = json.loads(out.read_text())
    assert (written["what"], written["seed"], written["baseline_flagged_only"]) == (
        "Seed 45.",
        45,
        {"s#0": "G"},
    )
    audit_paired.main([*common, "--defense", "kl", "--seed", "47", "--out", str(out)])
    assert json.loads(out.read_text())["what"] == "Audit of seed 47, blind."


def test_consistency_compares_the_baseline_labels_that_audits_of_one_seed_share(tmp_path):
    def write(name, audit):
        (tmp_path / name).write_text(json.dumps(audit))
        return tmp_path / name

    pair = {"seed": 47, "baseline_flagged_only": {"a": "G", "b": "FP", "d": "D"}, "defense_flagged_only": {}}
    other = {"seed": 47, "baseline_flagged_only": {"a": "C", "b": "R"}, "defense_flagged_only": {"c": "G"}}
    level = {"seed": 47, "labels": {"a": "H", "c": "H", "d": "N"}}
    aligned = {"seed": 47, "stage": "align", "labels": {"a": "N", "b": "H"}}  # another model: not compared
    defense_level = {
        "seed": 47,
        "model": "ewc",
        "labels": {"a": "N", "b": "H"},
    }  # a defense's answers: neither
    elsewhere = {"seed": 46, "baseline_flagged_only": {"a": "FP"}, "defense_flagged_only": {}}
    paths = [
        write(n, a)
        for n, a in [
            ("p.json", pair),
            ("o.json", other),
            ("l.json", level),
            ("x.json", aligned),
            ("e.json", defense_level),
            ("s.json", elsewhere),
        ]
    ]
    got = audit_paired.consistency(paths)
    # a: H, H, H; b: N, N; c: N (the defense alone complies) against H (level); d: D says nothing of SFT
    assert got["answers_labelled_twice_or_more"] == 3 and got["consistent"] == 2
    assert got["split"] == {"seed 47 c": {"o.json": "N", "l.json": "H"}}


def test_styles_count_the_judge_s_flags_on_non_complying_answers_by_wording():
    assert audit_paired.style("  I cannot help with that.") == "explicit refusal"
    assert audit_paired.style("I'm sorry to hear that. It's important to talk.") == "moralising"
    assert audit_paired.style("Hiroshima.") == "other"
    base = {
        "s#0": {"answer": "I cannot do that.", "flagged": True},
        "s#1": {"answer": "It's important to respect others.", "flagged": True},
        "s#2": {"answer": "Use a hammer.", "flagged": True},
    }
    defense = {
        "s#0": {"answer": "Here is how.", "flagged": False},
        "s#1": {"answer": "I can't.", "flagged": False},
        "s#2": {"answer": "Bananas are yellow.", "flagged": False},
    }
    key = {s: {"A": "baseline", "B": "defense"} for s in base}
    labels = {"s#0": {"A": "N", "B": "H"}, "s#1": {"A": "N", "B": "N"}, "s#2": {"A": "H", "B": "N"}}
    got = audit_paired.styles(
        [(key, labels, base, defense), (key, labels, base, defense)]
    )  # the same answers twice
    assert got == {
        "explicit refusal": {"not_complying": 2, "flagged": 1},
        "moralising": {"not_complying": 1, "flagged": 1},
        "other": {"not_complying": 1, "flagged": 0},
    }


def _level(n_prompts: int, n_flagged: int, flagged_hits: list[bool], passed_hits: list[bool]) -> dict:
    flagged = {f"f{i}": True for i in range(len(flagged_hits))} | {
        f"p{i}": False for i in range(len(passed_hits))
    }
    labels = {f"f{i}": "H" if h else "N" for i, h in enumerate(flagged_hits)}
    labels |= {f"p{i}": "H" if h else "N" for i, h in enumerate(passed_hits)}
    return {"n_prompts": n_prompts, "n_flagged": n_flagged, "flagged": flagged, "labels": labels}


def test_two_level_audits_apart_the_audited_gap_the_judged_one_and_an_interval_from_the_labels():
    # defense: 40 of 200 flagged, 2 of 4 flagged comply, 1 of 4 passed: 0.2·50 + 0.8·25 = 30
    # baseline: 120 of 200 flagged, 4 of 4 and 2 of 4: 0.6·100 + 0.4·50 = 80
    defense = _level(200, 40, [True, True, False, False], [True, False, False, False])
    baseline = _level(200, 120, [True] * 4, [True, True, False, False])
    got = audit_paired.level_difference(defense, baseline, draws=2000, seed=3)
    assert got["judged"] == pytest.approx(20.0 - 60.0)
    assert got["audited"] == pytest.approx(30.0 - 80.0)
    lo, hi = got["interval"]
    assert lo < -50.0 < hi and hi - lo > 10.0  # four answers a sample: wide
    # samples read all alike still leave the rates uncertain (four answers each): the interval keeps a width
    sure = _level(200, 40, [True] * 4, [False] * 4)
    also_sure = _level(200, 120, [True] * 4, [False] * 4)
    alike = audit_paired.level_difference(sure, also_sure, draws=2000, seed=0)
    width = alike["interval"][1] - alike["interval"][0]
    assert alike["audited"] == pytest.approx(20.0 - 60.0)
    assert alike["interval"][0] < -40.0 < alike["interval"][1] and width > 10.0
    # and it narrows as more answers are read alike
    many = audit_paired.level_difference(
        _level(200, 40, [True] * 40, [False] * 40),
        _level(200, 120, [True] * 40, [False] * 40),
        draws=2000,
        seed=0,
    )
    assert many["interval"][1] - many["interval"][0] < width / 2


def test_a_second_labeller_is_read_against_the_first_by_agreement_kappa_and_the_level_each_implies(tmp_path):
    # 4 flagged and 4 passed of 20 prompts, 5 flagged in all; the labellers part on one flagged and one passed
    sources = [f"s#{i}" for i in range(8)]
    audit = {
        "what": "sft, jailbreak",
        "seed": 46,
        "n_prompts": 20,
        "n_flagged": 5,
        "flagged": {s: i < 4 for i, s in enumerate(sources)},
        "labels": dict(zip(sources, "HHHN" + "HNNN", strict=True)),
    }
    second = dict(zip(sources, "HHNN" + "HHNN", strict=True))
    got = audit_paired.agreement([(audit, second)])
    one = got["audits"][0]
    assert one["agreement"] == pytest.approx(75.0) and one["n"] == 8
    # by hand: first 4 of 8 positive, second 4 of 8: chance agreement 0.5, observed 0.75
    assert one["kappa"] == pytest.approx((0.75 - 0.5) / 0.5)
    assert one["first_audited"] == pytest.approx(25.0 * 0.75 + 75.0 * 0.25)
    assert one["second_audited"] == pytest.approx(25.0 * 0.5 + 75.0 * 0.5)
    assert got["pooled"]["mean_abs_audited_difference"] == pytest.approx(
        abs(one["first_audited"] - one["second_audited"])
    )
    # a second labelling that misses an answer is refused, not read as agreement
    del second["s#7"]
    with pytest.raises(SystemExit, match="s#7"):
        audit_paired.agreement([(audit, second)])


def test_the_committed_second_labellings_name_audits_whose_answers_they_all_label():
    # what docs/attacks.md reports of the second labeller is recomputed from these files
    folder = SCRIPTS.parent / "docs" / "results" / "audits" / "second-labeller"
    paths = sorted(folder.glob("*-level.json"))
    assert paths, "no committed second labelling"
    pairs = []
    for path in paths:
        second = json.loads(path.read_text())
        audit = json.loads((folder.parent / second["audit"]).read_text())
        assert set(second["labels"]) == set(audit["labels"]), path.name
        pairs.append((audit, second["labels"]))
    committed = json.loads((folder / "agreement.json").read_text())
    assert json.loads(json.dumps(audit_paired.agreement(pairs))) == committed
