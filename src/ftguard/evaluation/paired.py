"""Two evaluations of the same prompts compared item by item: does a setting (batch size, precision) move a rate?

Rates from the same prompts are paired, so the unpaired Newcombe interval of ``stats`` is far too wide to see a
small, systematic change. What moves a paired rate is only the items whose outcome flipped: b went from yes to
no, c from no to yes. McNemar's exact test asks whether b and c could be the two halves of a fair coin's
b + c tosses; the rate difference is (c − b)/n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(|X − m/2| ≥ |b − m/2|) for X ~ Binomial(m = b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be ≥ 0, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2.0 * tail)


def paired_change(before: Sequence[bool], after: Sequence[bool]) -> dict[str, Any]:
    """How a binary outcome over the same items changed: both rates (%), the flips each way, McNemar's p."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes need the same items, got {len(before)} and {len(after)}")
    n = len(before)
    lost = sum(1 for x, y in zip(before, after, strict=True) if x and not y)
    gained = sum(1 for x, y in zip(before, after, strict=True) if y and not x)
    k_before, k_after = sum(map(bool, before)), sum(map(bool, after))
    return {
        "n": n,
        "before": 100.0 * k_before / n if n else float("nan"),
        "after": 100.0 * k_after / n if n else float("nan"),
        "difference": 100.0 * (k_after - k_before) / n if n else float("nan"),
        "flipped_to_yes": gained,
        "flipped_to_no": lost,
        "p_value": mcnemar_exact(lost, gained),
    }


def identical_share(before: Sequence[str], after: Sequence[str]) -> float:
    """Percent of items whose two answers are the same text."""
    if len(before) != len(after):
        raise ValueError(f"paired answers need the same items, got {len(before)} and {len(after)}")
    return 100.0 * sum(a == b for a, b in zip(before, after, strict=True)) / len(before) if before else 100.0
