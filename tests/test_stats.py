"""Interval and agreement math against published and hand-computed values."""

from __future__ import annotations

import pytest

from ftguard.evaluation.stats import cohen_kappa, difference_interval, rate, wilson_interval, within_noise


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (0, 10, 0.0, 27.75),  # the "rule of three"-like upper bound for no events in 10
        (5, 10, 23.66, 76.34),
        (10, 10, 72.25, 100.0),
        (81, 263, 25.53, 36.62),  # Newcombe (1998) Table I, 81/263: 0.2553 to 0.3662
    ],
)
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    got_lo, got_hi = wilson_interval(k, n)
    assert got_lo == pytest.approx(lo, abs=0.1)
    assert got_hi == pytest.approx(hi, abs=0.1)


def test_wilson_interval_contains_the_estimate_and_shrinks_with_n():
    lo_small, hi_small = wilson_interval(3, 10)
    lo_big, hi_big = wilson_interval(300, 1000)
    assert lo_small < 30 < hi_small and lo_big < 30 < hi_big
    assert hi_big - lo_big < (hi_small - lo_small) / 5


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_newcombe_difference_interval_matches_the_paper():
    # Newcombe (1998), Statistics in Medicine 17, Table II example (a): 56/70 − 48/80, method 10: 0.0524 to 0.3339.
    lo, hi = difference_interval(56, 70, 48, 80)
    assert lo == pytest.approx(5.24, abs=0.05)
    assert hi == pytest.approx(33.39, abs=0.05)
    assert not within_noise(56, 70, 48, 80)


def test_small_samples_make_a_large_looking_difference_noise():
    # 10/64 vs 18/64 (HS 15.6 vs 28.1) cannot be told apart at 64 prompts; 10/640 vs 180/640 can.
    assert within_noise(10, 64, 18, 64)
    assert not within_noise(100, 640, 180, 640)


def test_cohen_kappa_on_hand_made_labels():
    # observed 3/4; chance 0.5·0.25 + 0.5·0.75 = 0.5 → κ = (0.75 − 0.5) / 0.5 = 0.5
    assert cohen_kappa([True, True, False, False], [True, False, False, False]) == pytest.approx(0.5)
    assert cohen_kappa([True, False, True], [True, False, True]) == pytest.approx(1.0)
    assert cohen_kappa([True, False], [False, True]) == pytest.approx(-1.0)
    assert cohen_kappa([False, False], [False, False]) is None  # both constant: undefined


def test_rate_reports_counts_and_interval():
    r = rate(16, 64)
    assert r["value"] == 25.0 and (r["k"], r["n"]) == (16, 64)
    assert r["ci95"][0] < 25.0 < r["ci95"][1]
