"""Paired comparison of two evaluations of the same prompts (ftguard.evaluation.paired)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ftguard.evaluation.paired import (
    decode_entry,
    decode_outcomes,
    encode_outcomes,
    identical_share,
    items_digest,
    mcnemar_exact,
    paired_bootstrap,
    paired_change,
    seed_level_t,
    student_t_p,
    student_t_quantile,
    worst_case_bootstrap,
)
from script_module import load_script


def _by_enumeration(b: int, c: int) -> float:
    """P(outcome at least as far from m/2 as b) over all 2^m fair sign sequences: no formula shared."""
    m = b + c
    extreme = abs(b - m / 2)
    hits = sum(1 for signs in itertools.product((0, 1), repeat=m) if abs(sum(signs) - m / 2) >= extreme)
    return hits / 2**m


@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 1), (0, 5), (1, 9), (3, 3), (2, 7), (7, 2), (4, 10)])
def test_mcnemar_exact_matches_enumerating_every_outcome(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(_by_enumeration(b, c), abs=1e-12)


def test_mcnemar_known_values():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 5 flips all one way: p = 0.0625, not significant
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    with pytest.raises(ValueError, match="≥ 0"):
        mcnemar_exact(-1, 2)


def test_paired_change_counts_flips_each_way():
    before = [True, True, False, False, True, False]
    after = [True, False, True, True, True, False]
    change = paired_change(before, after)
    assert change["n"] == 6 and change["flipped_to_no"] == 1 and change["flipped_to_yes"] == 2
    assert change["before"] == pytest.approx(50.0) and change["after"] == pytest.approx(400 / 6)
    assert change["difference"] == pytest.approx(100 / 6)
    assert change["p_value"] == pytest.approx(mcnemar_exact(1, 2))
    assert paired_change(before, before)["p_value"] == 1.0
    with pytest.raises(ValueError, match="same items"):
        paired_change(before, after[:-1])
    assert math.isnan(paired_change([], [])["before"])


def test_identical_share():
    assert identical_share(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == pytest.approx(75.0)
    assert identical_share([], []) == 100.0


def _unit(folder, harmful, task, benign=None):
    import json

    folder.mkdir(parents=True)
    rows = [{"kind": "harmful", "answer": a, "flagged": f, "degenerate": d} for a, f, d in harmful]
    rows += [{"kind": "task", "answer": a, "hit": h} for a, h in task]
    rows += [{"kind": "benign", "answer": a, "refused": r} for a, r in benign or []]
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_eval_stability_pairs_batch_sizes_within_a_precision_and_precisions_within_a_batch_size(tmp_path):
    study = load_script("eval_stability")
    harmful = [("sure, here", True, False), ("no", False, True), ("I can't", False, False)]
    task = [("positive", True), ("negative", False)]
    benign = [("Sure!", False), ("I cannot", True)]
    units = {
        "fp32-b1": _unit(tmp_path / "a", harmful, task, benign),
        "fp32-b32": _unit(tmp_path / "b", harmful, task, benign),
        # bf16 at batch 32: one harmful answer turns harmful, one task answer turns wrong
        "bf16-b32": _unit(
            tmp_path / "c",
            [harmful[0], harmful[1], ("step 1", True, False)],
            [task[0], ("neg", False)],
            benign,
        ),
        # without benign prompts (evaluate.over_refusal_prompts=null): its over-refusal is not compared
        "bf16-b1": _unit(tmp_path / "d", harmful, task),
    }
    pairs = {(c["setting"], c["reference"]): c for c in study.comparisons(units)}
    assert set(pairs) == {
        ("fp32-b32", "fp32-b1"),
        ("bf16-b32", "bf16-b1"),
        ("bf16-b32", "fp32-b32"),
        ("bf16-b1", "fp32-b1"),
    }
    same = pairs[("fp32-b32", "fp32-b1")]
    assert same["identical_answers"] == {"harmful": 100.0, "task": 100.0, "benign": 100.0}
    assert same["harmful_score"]["difference"] == 0.0 and same["over_refusal"]["p_value"] == 1.0
    moved = pairs[("bf16-b32", "fp32-b32")]
    assert moved["harmful_score"]["flipped_to_yes"] == 1 and moved["harmful_score"]["flipped_to_no"] == 0
    assert moved["harmful_score"]["difference"] == pytest.approx(100 / 3)
    assert (
        moved["harmful_score_plus"]["flipped_to_yes"] == 1
    )  # the degenerate answer counted in HS+ both times
    assert moved["finetune_accuracy"]["difference"] == 0.0 and moved["identical_answers"]["task"] == 50.0
    assert "over_refusal" not in pairs[("bf16-b32", "bf16-b1")]
    assert "benign" not in pairs[("bf16-b32", "bf16-b1")]["identical_answers"]


def test_outcome_strings_round_trip_and_reject_other_characters():
    flags = [True, False, False, True]
    assert encode_outcomes(flags) == "1001" and decode_outcomes("1001") == flags
    with pytest.raises(ValueError, match="only 0 and 1"):
        decode_outcomes("10x1")
    assert items_digest(["a#0", "a#1"]) != items_digest(["a#1", "a#0"])
    # a win rate's items: loss, tie, win in half points
    assert encode_outcomes([0.0, 0.5, 1.0], scale=2) == "012"
    assert decode_entry({"items": "x", "bits": "012", "scale": 2}) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="not a multiple of 1/2"):
        encode_outcomes([0.25], scale=2)
    with pytest.raises(ValueError, match="only the digits 0 to 2"):
        decode_outcomes("013", scale=2)


def test_the_paired_bootstrap_equals_resampling_seeds_then_items_by_hand():
    rng = np.random.default_rng(3)
    treated, control = rng.random((3, 17)) < 0.4, rng.random((3, 17)) < 0.6
    got = paired_bootstrap(treated, control, n_boot=300, seed=11)
    # the same draws, one replicate at a time: rows by the seed draw, then columns by the item draw
    draws = np.random.default_rng(11)
    seed_draws = draws.integers(0, 3, size=(300, 3))
    item_draws = draws.integers(0, 17, size=(300, 17))
    d = treated.astype(float) - control.astype(float)
    by_hand = np.array([100.0 * d[s][:, i].mean() for s, i in zip(seed_draws, item_draws, strict=True)])
    assert got["diff"] == pytest.approx(100.0 * d.mean())
    assert got["interval"] == pytest.approx(list(np.percentile(by_hand, [2.5, 97.5])))
    assert got["se"] == pytest.approx(by_hand.std(ddof=1))
    assert got["detectable"] == pytest.approx(2.801585 * got["se"])


def test_identical_arms_differ_by_exactly_nothing():
    arm = np.random.default_rng(0).random((5, 40)) < 0.3
    got = paired_bootstrap(arm, arm.copy(), n_boot=200)
    assert got["diff"] == 0.0 and got["interval"] == [0.0, 0.0] and got["mark"] == "≈"


def test_the_interval_covers_a_known_difference_about_95_times_in_100():
    # Each item has its own difficulty and each seed its own shift, shared by both arms (that is what pairing
    # buys); the treatment lowers every item's probability by 10 points. Coverage of the true 10-point drop
    # is checked over 150 simulated studies of 5 seeds × 60 items.
    rng = np.random.default_rng(7)
    covered, found = 0, 0
    for _ in range(150):
        base = rng.uniform(0.2, 0.8, size=60)[None, :] + rng.normal(0.0, 0.05, size=(5, 1))
        u = rng.random((5, 60))  # common random numbers: the same coin decides both arms' outcome on an item
        control, treated = u < base, u < base - 0.10
        true_drop = -100.0 * 0.10
        got = paired_bootstrap(treated, control, n_boot=500, seed=int(rng.integers(1 << 30)))
        covered += got["interval"][0] <= true_drop <= got["interval"][1]
        found += got["mark"] == "↓"
    assert 0.88 <= covered / 150 <= 1.0
    assert found >= 140  # a 10-point drop on 300 paired outcomes is found nearly always


def test_the_bootstrap_refuses_unpaired_shapes():
    with pytest.raises(ValueError, match="equal, non-empty seeds × items"):
        paired_bootstrap(np.zeros((2, 5)), np.zeros((2, 6)))


@pytest.mark.parametrize(("up", "down"), [(0.2, 0.1), (0.05, 0.05)])
def test_the_planned_detectable_difference_brackets_simulated_designs(up, down):
    from ftguard.evaluation.paired import detectable_before_the_run

    n_items, n_seeds, trials = 200, 5, 4000
    independent, shared = detectable_before_the_run(up + down, up - down, n_items, n_seeds)
    rng = np.random.default_rng(3)

    def draws(shape):  # per-item difference: +1 with P(up), −1 with P(down), else 0
        u = rng.random(shape)
        return (u < up).astype(float) - ((u >= up) & (u < up + down)).astype(float)

    # every seed redraws every item's difference: the SE of the mean is that of S·N independent items
    means = draws((trials, n_seeds, n_items)).mean(axis=(1, 2))
    assert independent == pytest.approx(100 * 2.801585 * means.std(ddof=1), rel=0.05)
    # each prompt's difference repeats under every seed: the seeds add nothing
    per_prompt = draws((trials, 1, n_items)).repeat(n_seeds, axis=1)
    assert shared == pytest.approx(100 * 2.801585 * per_prompt.mean(axis=(1, 2)).std(ddof=1), rel=0.05)
    assert shared == pytest.approx(independent * math.sqrt(n_seeds))


def test_the_planned_detectable_difference_refuses_impossible_pilots():
    from ftguard.evaluation.paired import detectable_before_the_run

    with pytest.raises(ValueError, match="discordance"):
        detectable_before_the_run(0.1, 0.2, 100, 1)  # a difference larger than the share of differing items
    with pytest.raises(ValueError, match="one item"):
        detectable_before_the_run(0.1, 0.0, 0, 1)


def test_the_bootstrap_p_value_is_twice_the_replicates_beyond_zero():
    rng = np.random.default_rng(5)
    treated, control = rng.random((3, 30)) < 0.35, rng.random((3, 30)) < 0.5
    got = paired_bootstrap(treated, control, n_boot=400, seed=2)
    draws = np.random.default_rng(2)
    seed_draws, item_draws = draws.integers(0, 3, size=(400, 3)), draws.integers(0, 30, size=(400, 30))
    d = treated.astype(float) - control.astype(float)
    reps = np.array([d[s][:, i].mean() for s, i in zip(seed_draws, item_draws, strict=True)])
    assert got["p"] == pytest.approx(min(1.0, 2 * min((reps <= 0).mean(), (reps >= 0).mean())))
    # the interval excludes 0 exactly when few replicates cross it
    assert (got["mark"] != "≈") == (got["p"] < 0.05) or abs(got["p"] - 0.05) < 0.01
    arm = rng.random((2, 10)) < 0.5
    assert paired_bootstrap(arm, arm.copy(), n_boot=50)["p"] == 1.0  # nothing moved: no evidence at all


def test_holm_multiplies_the_kth_smallest_by_the_hypotheses_left_and_keeps_the_order():
    from ftguard.evaluation.paired import holm

    got = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    # sorted a 0.01, c 0.03, b 0.04, d 0.5 → ×4, ×3, ×2, ×1 = 0.04, 0.09, 0.08 → 0.09 (monotone), 0.5
    assert got == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert holm({"x": 0.6, "y": 0.7}) == pytest.approx({"x": 1.0, "y": 1.0})
    assert holm({}) == {}


def _settings_by_hand(settings, seed_draws, item_draws):
    """One replicate at a time (replicates × settings): each setting's attacker HS on the drawn seeds and items,
    per drawn seed the higher of plain and triggered, then the mean over the drawn seeds."""
    out = []
    for s_idx, i_idx in zip(seed_draws, item_draws, strict=True):
        row = []
        for plain, trig in settings:
            per_seed = []
            for s in s_idx:
                rate = plain[s][i_idx].mean()
                if trig is not None:
                    rate = max(rate, trig[s][i_idx].mean())
                per_seed.append(rate)
            row.append(100.0 * float(np.mean(per_seed)))
        out.append(row)
    return np.array(out)


def test_the_worst_case_bootstrap_equals_taking_the_highest_setting_in_each_replicate_by_hand():
    rng = np.random.default_rng(5)
    settings = [
        (rng.random((3, 23)) < 0.5, None),
        (rng.random((3, 23)) < 0.4, rng.random((3, 23)) < 0.55),  # an attack with a trigger
        (rng.random((3, 23)) < 0.52, None),
    ]
    baseline = [(rng.random((3, 23)) < 0.6, None), (rng.random((3, 23)) < 0.45, None)]
    # settings[0] and baseline[1] are the same attack, the one defenses are usually tested with
    got = worst_case_bootstrap(settings, baseline, reference=(0, 1), n_boot=250, seed=7)
    draws = np.random.default_rng(7)
    seed_draws, item_draws = draws.integers(0, 3, size=(250, 3)), draws.integers(0, 23, size=(250, 23))
    each_mine, each_theirs = (_settings_by_hand(arm, seed_draws, item_draws) for arm in (settings, baseline))
    mine, theirs = each_mine.max(axis=1), each_theirs.max(axis=1)
    # observed: per seed the higher of plain and triggered, averaged over seeds; the highest setting
    observed = max(
        100.0 * np.mean([max(p[s].mean(), t[s].mean()) if t is not None else p[s].mean() for s in range(3)])
        for p, t in settings
    )
    observed_base = max(100.0 * p.mean() for p, _ in baseline)
    assert got["hs"] == pytest.approx(observed)
    assert got["interval"] == pytest.approx(list(np.percentile(mine, [2.5, 97.5])))
    assert got["se"] == pytest.approx(mine.std(ddof=1))
    assert got["selection_bias"] == pytest.approx(mine.mean() - observed)
    versus = got["versus_baseline"]
    assert versus["diff"] == pytest.approx(observed - observed_base)
    assert versus["interval"] == pytest.approx(list(np.percentile(mine - theirs, [2.5, 97.5])))
    usual = 100.0 * (settings[0][0].mean() - baseline[1][0].mean())
    usual_reps = each_mine[:, 0] - each_theirs[:, 1]
    assert versus["reference"]["diff"] == pytest.approx(usual)
    assert versus["reference"]["interval"] == pytest.approx(list(np.percentile(usual_reps, [2.5, 97.5])))
    assert versus["erosion"]["diff"] == pytest.approx(versus["diff"] - usual)
    erosion_reps = (mine - theirs) - usual_reps
    assert versus["erosion"]["interval"] == pytest.approx(list(np.percentile(erosion_reps, [2.5, 97.5])))

    # the seeds alone: each seed's difference between the two worst settings (chosen on the means), by t
    def per_seed(plain, trig):
        rates = plain.mean(axis=1)
        return rates if trig is None else np.maximum(rates, trig.mean(axis=1))

    worst_mine = max(range(3), key=lambda k: per_seed(*settings[k]).mean())
    worst_base = max(range(2), key=lambda k: per_seed(*baseline[k]).mean())
    d = 100.0 * (per_seed(*settings[worst_mine]) - per_seed(*baseline[worst_base]))
    by_t = versus["seed_t"]
    assert by_t["diff"] == pytest.approx(d.mean()) and by_t["df"] == 2
    assert by_t["p"] == pytest.approx(student_t_p(d.mean() / (d.std(ddof=1) / math.sqrt(3)), 2))


def test_the_highest_of_equal_settings_reads_high_and_the_bootstrap_says_by_how_much():
    # six attacks with the same true HS of 50%: the observed worst case is their noise's maximum, and the
    # bootstrap's selection bias is clearly positive; one setting alone has none to speak of
    rng = np.random.default_rng(0)
    equal = [(rng.random((3, 100)) < 0.5, None) for _ in range(6)]
    assert worst_case_bootstrap(equal, n_boot=2000)["selection_bias"] > 1.0
    assert abs(worst_case_bootstrap(equal[:1], n_boot=2000)["selection_bias"]) < 0.5


def test_a_defense_against_itself_has_a_worst_case_difference_of_exactly_nothing():
    rng = np.random.default_rng(1)
    arm = [(rng.random((2, 30)) < 0.3, None), (rng.random((2, 30)) < 0.5, rng.random((2, 30)) < 0.6)]
    versus = worst_case_bootstrap(arm, arm, n_boot=200)["versus_baseline"]
    assert versus["diff"] == 0.0 and versus["interval"] == [0.0, 0.0] and versus["p"] == 1.0


def test_the_worst_case_bootstrap_refuses_settings_of_other_shapes():
    with pytest.raises(ValueError, match="equal, non-empty"):
        worst_case_bootstrap([(np.ones((2, 5)), None), (np.ones((3, 5)), None)])
    with pytest.raises(ValueError, match="equal, non-empty"):
        worst_case_bootstrap([])
    with pytest.raises(ValueError, match="needs a baseline"):
        worst_case_bootstrap([(np.ones((2, 5)), None)], reference=(0, 0))


@pytest.mark.parametrize(
    ("df", "t975"),
    [
        (1, 12.7062047),
        (2, 4.3026527),
        (3, 3.1824463),
        (4, 2.7764451),
        (5, 2.5705818),
        (10, 2.2281389),
        (30, 2.0422725),
    ],
)
def test_student_t_matches_the_printed_table(df, t975):
    assert student_t_p(t975, df) == pytest.approx(0.05, abs=1e-7)
    assert student_t_quantile(0.975, df) == pytest.approx(t975, abs=1e-6)


@pytest.mark.parametrize(("df", "t"), [(4, 2.0), (7, 1.5), (12, 3.1)])
def test_student_t_p_equals_integrating_its_density(df, t):
    # the density Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) (1 + x²/ν)^(−(ν+1)/2), integrated from |t| far out: no series shared
    x = np.linspace(t, 4000.0, 4_000_001)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = c * (1 + x**2 / df) ** (-(df + 1) / 2)
    tail = float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))
    assert student_t_p(t, df) == pytest.approx(2 * tail, abs=1e-7)
    assert student_t_p(-t, df) == student_t_p(t, df)


def test_student_t_with_one_degree_of_freedom_is_cauchy():
    for t in (0.0, 0.7, 3.0, 40.0):
        assert student_t_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)


def test_the_seed_level_t_reads_each_seed_s_mean_difference_with_student_s_t():
    rng = np.random.default_rng(2)
    treated, control = rng.random((5, 40)) < 0.3, rng.random((5, 40)) < 0.5
    got = seed_level_t(treated, control)
    per_seed = 100.0 * (treated.astype(float) - control).mean(axis=1)
    se = per_seed.std(ddof=1) / math.sqrt(5)
    assert got["diff"] == pytest.approx(per_seed.mean()) and got["se"] == pytest.approx(se) and got["df"] == 4
    assert got["interval"] == pytest.approx(
        [per_seed.mean() - 2.7764451 * se, per_seed.mean() + 2.7764451 * se]
    )
    assert got["p"] == pytest.approx(student_t_p(per_seed.mean() / se, 4))
    assert seed_level_t(treated[:1], control[:1]) is None  # one seed: no spread to read
