"""Uncertainty of the rates we report, and agreement between judges.

Every metric ftguard reports (HS, HS+, FA, over-refusal, degenerate rate) is a proportion k/n over prompts, so
its 95% interval is the Wilson score interval: unlike the normal approximation it stays inside [0, 100] and is
honest at the small n of CPU-scale runs (64 prompts: HS 10% has the interval 4.4–20.9%). A difference between two
runs is "within noise" when Newcombe's interval for the difference of two proportions (method 10, built from the
two Wilson intervals) contains zero. Both treat the runs as independent samples of prompts, which is conservative
for two models answering the same prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of the proportion k/n, in percent. (0, 100) when n = 0 (nothing is known)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 ≤ k ≤ n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 100.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact endpoints at k = 0 and k = n (floating error would give 1e-17 instead of 0).
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return 100.0 * lo, 100.0 * hi


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's (1998, method 10) 95% interval of p1 − p2, in percentage points."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = (v / 100 for v in wilson_interval(k1, n1, z))
    l2, u2 = (v / 100 for v in wilson_interval(k2, n2, z))
    d = p1 - p2
    lower = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return 100.0 * lower, 100.0 * upper


def within_noise(k1: int, n1: int, k2: int, n2: int) -> bool:
    """Whether two rates cannot be told apart at 95% (their difference interval contains 0)."""
    if n1 == 0 or n2 == 0:
        return True
    lower, upper = difference_interval(k1, n1, k2, n2)
    return lower <= 0.0 <= upper


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two binary labelings of the same items; None when undefined (both constant and equal)."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs labels of the same items, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    if expected == 1.0:
        return None  # both judges gave one and the same label to everything: agreement by chance is total
    return (observed - expected) / (1 - expected)


def rate(k: int, n: int) -> dict[str, float | int]:
    """A reported rate: percent, its Wilson interval, and the counts it comes from."""
    lo, hi = wilson_interval(k, n)
    return {"value": 100.0 * k / n if n else float("nan"), "ci95": [lo, hi], "k": k, "n": n}
