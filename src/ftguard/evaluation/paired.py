"""Two evaluations of the same prompts compared item by item: does a setting (batch size, precision) or a defense
move a rate?

Rates from the same prompts are paired, so the unpaired Newcombe interval of ``stats`` is far too wide to see a
small, systematic change. What moves a paired rate is only the items whose outcome flipped: b went from yes to
no, c from no to yes. McNemar's exact test asks whether b and c could be the two halves of a fair coin's
b + c tosses; the rate difference is (c − b)/n. Over several training seeds, ``paired_bootstrap`` resamples seeds
and items together.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


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


# Normal quantiles of a two-sided 5% test at 80% power: a difference of (1.96 + 0.84) standard errors is found
# four times in five.
_DETECTABLE_SE = 1.959964 + 0.841621


def encode_outcomes(outcomes: Sequence[float], scale: int = 1) -> str:
    """Per-item outcomes as a digit string: results.json keeps them (no prompt text) so that two runs on the same
    prompts can be compared item by item after their answers are gone. Binary outcomes are '0'/'1'; a score in
    steps of 1/``scale`` (a win rate, where a tie counts ½: scale 2) is the digit score × scale."""
    if not 1 <= scale <= 9:
        raise ValueError(f"an outcome scale is 1 to 9 steps, got {scale}")
    digits = []
    for value in outcomes:
        steps = float(value) * scale
        if not 0 <= round(steps) <= scale or abs(round(steps) - steps) > 1e-9:
            raise ValueError(f"outcome {value!r} is not a multiple of 1/{scale} in [0, 1]")
        digits.append(str(round(steps)))
    return "".join(digits)


def decode_outcomes(bits: str, scale: int = 1) -> list[float]:
    """The outcomes of ``encode_outcomes`` in [0, 1] (0.0 and 1.0 for binary ones)."""
    allowed = "0123456789"[: scale + 1]
    if set(bits) - set(allowed):
        what = "only 0 and 1" if scale == 1 else f"only the digits 0 to {scale}"
        raise ValueError(f"outcome string must hold {what}, got {bits[:20]!r}…")
    return [int(c) / scale for c in bits]


def decode_entry(entry: dict[str, Any]) -> list[float]:
    """The outcomes of one results.json ``outcomes`` entry ({"items", "bits"[, "scale"]})."""
    return decode_outcomes(entry["bits"], int(entry.get("scale", 1)))


def items_digest(sources: Sequence[str]) -> str:
    """Names the ordered items an outcome string is over: two strings pair only when their digests are equal."""
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:12]


def _paired_arms(treated: Any, control: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(treated, dtype=float), np.asarray(control, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(
            f"paired outcomes need two equal, non-empty seeds × items arrays, got {a.shape} and {b.shape}"
        )
    return a, b


def paired_bootstrap(treated: Any, control: Any, *, n_boot: int = 4000, seed: int = 0) -> dict[str, Any]:
    """Difference of two rates measured on the same seeds and the same items, with a two-level bootstrap interval.

    ``treated`` and ``control`` are (seeds × items) arrays of 0/1 outcomes; row s of both comes from seed s, column i
    from item i (the same prompt). Each replicate draws seeds with replacement, then items with replacement, the
    same draws for both arms, so the interval carries both the seed-to-seed spread of training and the choice of
    prompts, and keeps their pairing (which makes it far narrower than two independent intervals).

    Returns the observed difference in points (treated − control), the 95% percentile interval, the bootstrap
    standard error, ``detectable``: the difference this design finds with 80% power at a two-sided 5% level
    (2.8 standard errors, normal approximation; a true effect below it is more likely missed than found), and
    ``p``: the two-sided bootstrap p-value, twice the share of replicates on the far side of 0 (the level at
    which the percentile interval would just reach 0), which ``holm`` corrects across defenses.
    """
    a, b = _paired_arms(treated, control)
    diff = a - b
    n_seeds, n_items = diff.shape
    seed_counts, item_counts = _draw_counts(n_boot, n_seeds, n_items, seed)
    # replicate r's mean difference = Σ_s Σ_i w[r,s] · d[s,i] · c[r,i] / (S·N), with w, c the draw counts
    replicates = 100.0 * np.einsum("rs,si,ri->r", seed_counts, diff, item_counts) / (n_seeds * n_items)
    summary = _difference_summary(100.0 * float(diff.mean()), replicates)
    # the key order of the reports archived before the worst case shared this summary
    order = ("diff", "interval", "se", "detectable", "seeds", "items", "mark", "p")
    return {k: (summary | {"seeds": n_seeds, "items": n_items})[k] for k in order}


def _draw_counts(n_boot: int, n_seeds: int, n_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each seed and each item is drawn in each replicate: (replicates × seeds, replicates × items)."""
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    item_draws = rng.integers(0, n_items, size=(n_boot, n_items))
    seed_counts = np.zeros((n_boot, n_seeds))
    np.add.at(seed_counts, (np.arange(n_boot)[:, None], seed_draws), 1.0)
    item_counts = np.zeros((n_boot, n_items))
    np.add.at(item_counts, (np.arange(n_boot)[:, None], item_draws), 1.0)
    return seed_counts, item_counts


def _difference_summary(observed: float, replicates: np.ndarray) -> dict[str, Any]:
    lower, upper = np.percentile(replicates, [2.5, 97.5])
    se = float(replicates.std(ddof=1))
    p = min(1.0, 2.0 * min(float((replicates <= 0).mean()), float((replicates >= 0).mean())))
    return {
        "diff": observed,
        "interval": [float(lower), float(upper)],
        "se": se,
        "detectable": _DETECTABLE_SE * se,
        "mark": "↓" if upper < 0 else "↑" if lower > 0 else "≈",
        "p": p,
    }


Setting = tuple[Any, Any | None]  # (plain, triggered) harm outcomes of one attack setting, seeds × items each


def worst_case_bootstrap(
    settings: Sequence[Setting],
    baseline: Sequence[Setting] | None = None,
    *,
    reference: tuple[int, int] | None = None,
    n_boot: int = 4000,
    seed: int = 0,
) -> dict[str, Any]:
    """A defense's worst case over the attack settings it was tried with, and its uncertainty.

    ``settings``: per kept attack setting, (plain, triggered): seeds × items arrays of 0/1 harm outcomes on the
    same seeds and items, ``triggered`` (the prompts asked through the trigger the attack taught) None for an
    attack without one. A setting's attacker HS at one seed is the higher of its plain and triggered rates (the
    attacker asks as he likes), averaged over the seeds; the worst case is the highest over the settings: what
    ``worst_case`` reports. Each replicate draws seeds, then items, with replacement (the same draws for every
    setting, as ``paired_bootstrap``) and takes the highest setting again, so the choice of the worst setting is
    inside the resampling.

    The highest of several noisy means is biased upward (the settings' noise is picked along with their effect):
    ``selection_bias``, the replicates' mean minus the observed worst case, estimates by how much, and the
    percentile ``interval`` leans up by about as much (read it as rough; it is exact for one setting). With
    ``baseline`` (another defense's kept settings, on the same seeds and items), ``versus_baseline`` is the paired
    difference of the two worst cases (this one − the baseline's), each replicate maximising both on the same
    draws: both carry the upward bias, which mostly cancels in the difference.

    ``reference`` = (i, j): ``settings[i]`` and ``baseline[j]`` are the same attack, the one a defense is usually
    tested with (the papers' upload). ``versus_baseline`` then also gives the defense's effect under that attack
    alone (``reference``) and how much of it the worst case takes away (``erosion``: the worst-case difference
    minus the reference one; positive when the defense looks better against the usual attack than against the
    attacker's pick), both on the same draws."""
    arms = [_setting_arrays(s) for s in settings]
    base = [_setting_arrays(s) for s in baseline] if baseline is not None else []
    shapes = {a.shape for arm in (*arms, *base) for a in arm if a is not None}
    if not arms or len(shapes) != 1 or 0 in next(iter(shapes)):
        raise ValueError(
            f"worst case needs settings of equal, non-empty seeds × items arrays, got {sorted(shapes)}"
        )
    n_seeds, n_items = next(iter(shapes))
    seed_counts, item_counts = _draw_counts(n_boot, n_seeds, n_items, seed)

    def per_setting(group: list[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray:
        """replicates × settings: each setting's attacker HS in each replicate."""
        out = []
        for plain, trig in group:
            # per replicate and seed: the item-weighted rate, plain or through the trigger, whichever is higher
            rates = np.einsum("si,ri->rs", plain, item_counts) / n_items
            if trig is not None:
                rates = np.maximum(rates, np.einsum("si,ri->rs", trig, item_counts) / n_items)
            out.append(100.0 * (seed_counts * rates).sum(axis=1) / n_seeds)
        return np.stack(out, axis=1)

    mine, means = per_setting(arms), _setting_means(arms)
    worst, reps = max(means), mine.max(axis=1)
    lower, upper = np.percentile(reps, [2.5, 97.5])
    out: dict[str, Any] = {
        "hs": worst,
        "interval": [float(lower), float(upper)],
        "se": float(reps.std(ddof=1)),
        "selection_bias": float(reps.mean()) - worst,
        "seeds": n_seeds,
        "items": n_items,
        "settings": len(arms),
    }
    if base:
        theirs, base_means = per_setting(base), _setting_means(base)
        differences = reps - theirs.max(axis=1)
        versus = _difference_summary(worst - max(base_means), differences)
        # the seeds as the only replication: each seed's difference between the two worst settings (as chosen
        # on the means, the first among ties as ``worst_case``), by Student's t (see seed_level_t)
        if n_seeds > 1:
            mine_worst, base_worst = arms[means.index(worst)], base[base_means.index(max(base_means))]
            versus["seed_t"] = t_over_seeds(100.0 * (_per_seed_hs(*mine_worst) - _per_seed_hs(*base_worst)))
        if reference is not None:
            i, j = reference
            usual = means[i] - base_means[j]
            usual_reps = mine[:, i] - theirs[:, j]
            versus["reference"] = _difference_summary(usual, usual_reps)
            versus["erosion"] = _difference_summary(versus["diff"] - usual, differences - usual_reps)
        out["versus_baseline"] = versus
    elif reference is not None:
        raise ValueError("a reference setting needs a baseline to compare with")
    return out


def _setting_means(group: list[tuple[np.ndarray, np.ndarray | None]]) -> list[float]:
    """Each setting's attacker HS (points), averaged over the seeds."""
    return [100.0 * float(_per_seed_hs(plain, trig).mean()) for plain, trig in group]


def _setting_arrays(setting: Setting) -> tuple[np.ndarray, np.ndarray | None]:
    plain, trig = setting
    return np.asarray(plain, dtype=float), (None if trig is None else np.asarray(trig, dtype=float))


def _per_seed_hs(plain: np.ndarray, trig: np.ndarray | None) -> np.ndarray:
    rates = plain.mean(axis=1)
    return rates if trig is None else np.maximum(rates, trig.mean(axis=1))


def seed_level_t(treated: Any, control: Any) -> dict[str, Any] | None:
    """The same paired difference read with the seeds as the only replication: each seed's mean difference over the
    items, then Student's t over the seeds (S − 1 degrees of freedom). None with fewer than two seeds.

    With few seeds the two-level bootstrap is light in its tails where the defense's effect varies from seed to
    seed: its p-values fall below 0.005 several times too often under no effect (docs/testbed.md, "How far the
    p-values can be trusted"), which is where Holm's correction over a dozen defenses reads them. The t test has
    the heavy tails five seeds call for, but it takes the prompts as fixed (their sampling is not in it), so it errs
    the other way where prompts differ in their effect. A fall that survives Holm under both is a finding under
    either reading; the study reports both."""
    a, b = _paired_arms(treated, control)
    per_seed = 100.0 * (a - b).mean(axis=1)
    return t_over_seeds(per_seed) if len(per_seed) > 1 else None


def t_over_seeds(per_seed: np.ndarray) -> dict[str, Any]:
    """Student's t over per-seed differences (points): mean, 95% interval, standard error, df, two-sided p."""
    n = len(per_seed)
    diff, se = float(per_seed.mean()), float(per_seed.std(ddof=1) / math.sqrt(n))
    half = student_t_quantile(0.975, n - 1) * se
    # no spread over the seeds: t is 0/0 (no difference) or infinite (the same difference at every seed)
    p = (1.0 if diff == 0 else 0.0) if se == 0 else student_t_p(diff / se, n - 1)
    return {"diff": diff, "interval": [diff - half, diff + half], "se": se, "df": n - 1, "p": p}


def student_t_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` (whole) degrees of freedom: 1 − P(|T| ≤ |t|), from the finite
    series of Abramowitz & Stegun 26.7.3–4 (no scipy)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a whole number ≥ 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, series, term = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd: (2/π)(θ + sin θ cos θ · Σ_k (2·4···2k)/(3·5···(2k+1)) cos^2k θ)
        for k in range(1, (df - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            series += term
        inside = 2.0 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0))
    else:  # even: sin θ · Σ_k (1·3···(2k−1))/(2·4···2k) cos^2k θ
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        inside = math.sin(theta) * series
    return min(1.0, max(0.0, 1.0 - inside))


def student_t_quantile(q: float, df: int) -> float:
    """The t with P(T ≤ t) = q (0.5 < q < 1), by bisection on ``student_t_p``."""
    if not 0.5 < q < 1:
        raise ValueError(f"quantile must lie in (0.5, 1), got {q}")
    lo, hi = 0.0, 1.0
    while student_t_p(hi, df) > 2 * (1 - q):
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_p(mid, df) > 2 * (1 - q) else (lo, mid)
    return (lo + hi) / 2


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (Holm 1979): the k-th smallest is multiplied by the
    number of hypotheses not yet rejected (m − k + 1), and the adjusted values are made non-decreasing in that
    order. An adjusted value below α rejects with a family-wise error of at most α, under any dependence between
    the tests: a dozen defenses read against one SFT share its outcomes."""
    order = sorted(p_values, key=p_values.__getitem__)
    m, running, out = len(order), 0.0, {}
    for k, name in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[name]))
        out[name] = running
    return out


def holm_family(cells: dict[str, dict[str, Any]]) -> None:
    """Set ``p_holm`` on each of a family's cells (one per defense, against the same baseline), and on the cells'
    ``seed_t`` readings, Holm over those that have one."""
    for name, adjusted in holm({d: cell["p"] for d, cell in cells.items()}).items():
        cells[name]["p_holm"] = adjusted
    by_t = {d: cell["seed_t"] for d, cell in cells.items() if cell.get("seed_t")}
    for name, adjusted in holm({d: t["p"] for d, t in by_t.items()}).items():
        by_t[name]["p_holm"] = adjusted


def detectable_before_the_run(
    discordance: float, difference: float, n_items: int, n_seeds: int
) -> tuple[float, float]:
    """The paired difference (points) a design of ``n_seeds`` × ``n_items`` finds with 80% power at a two-sided 5%
    level, planned from a pilot: the share of items whose outcome differs between the two arms (``discordance``,
    0–1) and the pilot's difference (``difference``, 0–1). A per-item difference D ∈ {−1, 0, 1} has variance
    discordance − difference². How much the seeds add depends on what a single pilot seed cannot show, so two
    bounds: (seeds redraw every item's difference independently, each prompt's difference repeats under every
    seed). The study's bootstrap (``paired_bootstrap``) tells where between them it lands."""
    if not 0 <= discordance <= 1 or abs(difference) > discordance + 1e-12:
        raise ValueError(f"need 0 ≤ |difference| ≤ discordance ≤ 1, got {difference} and {discordance}")
    if n_items < 1 or n_seeds < 1:
        raise ValueError(f"need at least one item and one seed, got {n_items} and {n_seeds}")
    variance = max(discordance - difference**2, 0.0)
    independent = 100.0 * _DETECTABLE_SE * math.sqrt(variance / (n_items * n_seeds))
    shared = 100.0 * _DETECTABLE_SE * math.sqrt(variance / n_items)
    return independent, shared
