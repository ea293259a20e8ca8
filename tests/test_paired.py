"""Paired comparison of two evaluations of the same prompts (ftguard.evaluation.paired)."""

from __future__ import annotations

import itertools
import math

import pytest

from ftguard.evaluation.paired import identical_share, mcnemar_exact, paired_change


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
