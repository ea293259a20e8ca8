"""The worst case of each defense over an adaptive attacker's settings (a sweep's ``attack:`` block).

Every attack setting is scored by its mean over seeds; the capability guard drops settings whose FA falls too far
(a user would notice a fine-tune that wrecks the task), and the worst case is the kept setting with the highest
mean HS. Its uncertainty comes from the per-prompt outcomes each run keeps (``worst_case_bootstrap``): an interval
for each defense's worst case, and the paired difference of a defense's worst case from the baseline's.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from ftguard.evaluation.paired import decode_entry, holm_family, worst_case_bootstrap
from ftguard.sweep.attack_settings import attack_setting, attacker_hs, grid_position
from ftguard.sweep.config import SweepConfig


def worst_case(rows: list[dict[str, Any]], sweep: SweepConfig) -> list[dict[str, Any]]:
    """Per defense and grid slice: each attack setting's mean HS/FA, the guard's verdict, the worst kept one, and
    ``cumulative_max``: the kept settings in the attack grid's order (the order an attacker who tries them in turn
    spends his budget in) with the best HS found so far after each. Settings are listed in grid order, so among
    tied settings the worst case is the one the attacker reaches first.

    A sweep in progress has some settings at more seeds than others, and seeds differ by more than attacks do
    (each seed aligns its own model): a defense's settings are compared on the seeds every one of them has
    (``seeds_compared``); the other runs count once their seed is complete. With no seed in common the means
    are over unequal seeds (``seeds_compared`` None)."""
    if sweep.attack is None:
        return []
    position = grid_position(sweep)
    guard = sweep.attack.capability_guard
    groups: dict[tuple, dict[tuple, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["final"]:
            grid = tuple((k, r[k]) for k in sorted(r) if k.startswith("grid."))
            groups[(r["defense"], grid)][attack_setting(r, sweep)].append(r)
    out = []
    # per entry: every tried setting → its runs by seed when the guard keeps it (None when it does not)
    tried: dict[tuple, dict[tuple, dict[int, dict[str, Any]] | None]] = {}
    for (defense, grid), settings in groups.items():
        entry, tried[(defense, grid)] = _entry(defense, grid, settings, position, guard)
        out.append(entry)
    _add_uncertainty(out, tried, sweep.baseline, position)
    order = list(sweep.defenses)
    return sorted(out, key=lambda e: (order.index(e["defense"]), sorted(e["slice"].items(), key=str)))


def _entry(
    defense: str,
    grid: tuple,
    settings: dict[tuple, list[dict[str, Any]]],
    position: Callable[[tuple], tuple[int, ...]],
    guard: Any,
) -> tuple[dict[str, Any], dict[tuple, dict[int, dict[str, Any]] | None]]:
    """(one defense's worst-case entry for one grid slice, its tried settings → kept runs by seed)."""
    common = set.intersection(*({r["seed"] for r in rs} for rs in settings.values()))
    if common:
        settings = {k: [r for r in rs if r["seed"] in common] for k, rs in settings.items()}
    ordered = sorted(settings.items(), key=lambda item: position(item[0]))
    scored = []
    for setting, rs in ordered:
        hs = [v for r in rs if (v := attacker_hs(r)) is not None]
        fa = [r["finetune_accuracy"] for r in rs if r["finetune_accuracy"] is not None]
        scored.append(
            {
                "setting": dict(setting),
                "hs": statistics.fmean(hs) if hs else None,
                "fa": statistics.fmean(fa) if fa else None,
                "seeds": len(rs),
            }
        )
    firsts = [position(setting) == (0,) for setting, _ in ordered]
    reference = _guard_reference(scored, firsts, guard)
    for s in scored:
        s["kept"], s["dropped_because"] = _guard(s["fa"], reference, guard)
    kept = [s for s in scored if s["kept"] and s["hs"] is not None]
    runs = {
        setting: {r["seed"]: r for r in rs} if common and s["kept"] and s["hs"] is not None else None
        for (setting, rs), s in zip(ordered, scored, strict=True)
    }
    best = -math.inf
    cumulative = []
    for s in kept:
        best = max(best, s["hs"])
        cumulative.append({"setting": s["setting"], "hs": s["hs"], "best_so_far": best})
    entry = {
        "defense": defense,
        "slice": dict(grid),
        "settings": scored,
        "seeds_compared": sorted(common) if common else None,
        "worst": max(kept, key=lambda s: s["hs"]) if kept else None,
        "guard_reference": reference,
        "kept": len(kept),
        "total": len(scored),
        "cumulative_max": cumulative,
    }
    return entry, runs


def _add_uncertainty(
    entries: list[dict[str, Any]],
    tried: dict[tuple, dict[tuple, dict[int, dict[str, Any]] | None]],
    baseline: str | None,
    position: Callable[[tuple], tuple[int, ...]],
) -> None:
    """Each entry's ``uncertainty`` from its kept runs' per-prompt outcomes (None where some run did not record
    them, or they are over different prompts): the worst case's interval over its compared seeds and, for a defense
    other than the baseline, the paired difference from the baseline's worst case over the seeds and the attack
    settings both were tried with (each side keeping what its own guard keeps: a sweep in progress has tried some
    defenses with more attacks than others), with Holm's adjustment over the defenses of its slice. When both kept
    the attacker's first setting (the usual attack), the difference under it and the erosion are given too."""
    for entry in entries:
        grid = tuple(entry["slice"].items())
        mine = tried.get((entry["defense"], grid), {})
        theirs = tried.get((baseline, grid), {}) if baseline and entry["defense"] != baseline else {}
        shared = [k for k in mine if k in theirs]  # tried with both, in the attacker's order
        first = shared[0] if shared and position(shared[0]) == (0,) else None
        entry["uncertainty"] = _worst_case_statistics(
            [runs for runs in mine.values() if runs is not None],
            [mine[k] for k in shared if mine[k] is not None],
            [theirs[k] for k in shared if theirs[k] is not None],
            usual=first is not None and mine[first] is not None and theirs[first] is not None,
        )
    for grid in {tuple(e["slice"].items()) for e in entries}:
        holm_family(
            {
                e["defense"]: e["uncertainty"]["versus_baseline"]
                for e in entries
                if tuple(e["slice"].items()) == grid and (e["uncertainty"] or {}).get("versus_baseline")
            }
        )


def _worst_case_statistics(
    own: list[dict[int, dict[str, Any]]],
    own_shared: list[dict[int, dict[str, Any]]],
    base: list[dict[int, dict[str, Any]]],
    usual: bool = False,
) -> dict[str, Any] | None:
    """``own``: the defense's kept settings' runs by seed; ``own_shared`` and ``base``: its and the baseline's kept
    settings among the attacks both were tried with; ``usual``: both lists start with the attacker's first."""
    seeds = _shared_seeds(own)
    arrays = _outcome_arrays(own, seeds)
    if arrays is None:
        return None
    stats = worst_case_bootstrap(arrays)
    out = {k: stats[k] for k in ("interval", "se", "selection_bias")} | {"seeds": seeds}
    joint = sorted(set(_shared_seeds(own_shared)) & set(_shared_seeds(base))) if own_shared and base else []
    if joint:
        mine, theirs = _outcome_arrays(own_shared, joint), _outcome_arrays(base, joint)
        if mine is not None and theirs is not None and _items(own_shared, joint) == _items(base, joint):
            paired = worst_case_bootstrap(mine, theirs, reference=(0, 0) if usual else None)
            versus = paired["versus_baseline"]
            out["versus_baseline"] = versus | {
                "hs": paired["hs"],
                "baseline_hs": paired["hs"] - versus["diff"],
                "seeds": joint,
                "settings": len(own_shared),
                "baseline_settings": len(base),
            }
    return out


def _shared_seeds(kept: list[dict[int, dict[str, Any]]]) -> list[int]:
    return sorted(set.intersection(*(set(by_seed) for by_seed in kept))) if kept else []


def _items(kept: list[dict[int, dict[str, Any]]], seeds: list[int]) -> set[str]:
    return {by_seed[s]["outcomes"]["harmful_score"]["items"] for by_seed in kept for s in seeds}


def _outcome_arrays(kept: list[dict[int, dict[str, Any]]], seeds: list[int]) -> list[tuple] | None:
    """Per kept setting, (plain, triggered) harm outcomes as seeds × items lists, the seeds in ``seeds`` order;
    None when a run lacks them or they are not all over the same prompts."""
    if not kept or not seeds:
        return None
    arrays, digests = [], set()
    for by_seed in kept:
        outcomes = [(by_seed[s].get("outcomes") or {}) for s in seeds]
        if any("harmful_score" not in o for o in outcomes):
            return None
        plain = [decode_entry(o["harmful_score"]) for o in outcomes]
        digests |= {o["harmful_score"]["items"] for o in outcomes}
        triggered = None
        if all("harmful_score_triggered" in o for o in outcomes):
            triggered = [decode_entry(o["harmful_score_triggered"]) for o in outcomes]
            digests |= {o["harmful_score_triggered"]["items"] for o in outcomes}
        arrays.append((plain, triggered))
    return arrays if len(digests) == 1 else None


def _guard_reference(scored: list[dict[str, Any]], firsts: list[bool], guard: Any) -> dict[str, Any] | None:
    """The setting whose FA ``max_fa_drop`` is measured from, as {"rule", "setting", "fa"} (fa None when that
    setting has no FA yet: then the drop cannot be measured and no setting is kept by it). ``firsts`` marks the
    setting that comes first in the attacker's order, if it was tried."""
    if guard.max_fa_drop is None:
        return None
    if guard.relative_to == "best":
        reference = max((s for s in scored if s["fa"] is not None), key=lambda s: s["fa"], default=None)
    else:
        reference = next((s for s, first in zip(scored, firsts, strict=True) if first), None)
    return {
        "rule": guard.relative_to,
        "setting": reference["setting"] if reference else None,
        "fa": reference["fa"] if reference else None,
    }


def _guard(fa: float | None, reference: dict[str, Any] | None, guard: Any) -> tuple[bool, str | None]:
    if fa is None:
        return False, "no FA"
    if guard.min_fa is not None and fa < guard.min_fa:
        return False, f"FA {fa:.1f} < min_fa {guard.min_fa:g}"
    if reference is None:
        return True, None
    name = "the best" if reference["rule"] == "best" else "the first setting's"
    if reference["fa"] is None:
        return False, f"{name} FA, the guard's reference, is not measured yet"
    if reference["fa"] - fa > guard.max_fa_drop:
        return False, f"FA {fa:.1f} is {reference['fa'] - fa:.1f} below {name} {reference['fa']:.1f}"
    return True, None
