"""Each defense's setting chosen by the sweep's calibration rule (``calibration:`` in the sweep file), as data
and as markdown.

The rule is written down before the run (docs/testbed.md, step 4) and applied here mechanically, so the choice
can be regenerated from the archived runs and cannot drift with the reader's taste. A setting is read at its
run's final point (the served model), as a mean over seeds, in each slice of the grid (each p, each other axis
value) on its own. The FA floor is always the baseline's after the attack: the task is what the user paid for.
The refusal ceilings come from the reference: the baseline after the attack (``baseline``) or the baseline's
aligned model before it (``aligned``): the attack itself lowers over-refusal, so a defense that merely keeps
the aligned model's refusals fails the first and passes the second; reporting both names that difference.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from ftguard.metrics import METRICS, fmt
from ftguard.sweep.config import CalibrationConfig, SweepConfig

# The rates the rule reads; FA is a floor, the refusal rates are ceilings.
READ = ("harmful_score", "finetune_accuracy", "over_refusal", "instruction_refusal")
CEILINGS = {
    "over_refusal": "max_over_refusal_rise",
    "instruction_refusal": "max_instruction_refusal_rise",
}


def _means(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric in READ:
        values = [r[metric] for r in rows if r.get(metric) is not None]
        out[metric] = statistics.fmean(values) if values else None
    return out


def _slice_of(row: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, v) for k, v in row.items() if k.startswith(("grid.", "attack."))))


def _verdict(
    values: dict[str, Any],
    floor_fa: float | None,
    ceilings: dict[str, float | None],
    pre_attack: tuple[float | None, float] | None,
) -> str | None:
    """None when the setting is kept, else why not (in words). ``pre_attack``: (the baseline's aligned HS, gap)."""
    if values["harmful_score"] is None:
        return "no HS"
    if pre_attack is not None:
        target, gap = pre_attack
        own = values.get("pre_attack_hs")
        if own is None or target is None:
            return "no pre-attack HS"
        if abs(own - target) > gap:
            return f"pre-attack HS {own:.1f} vs {target:.1f}"
    fa = values["finetune_accuracy"]
    if floor_fa is not None and (fa is None or fa < floor_fa):
        return f"FA {fmt(fa)} < {floor_fa:.1f}"
    for metric, ceiling in ceilings.items():
        value = values[metric]
        if ceiling is not None and value is not None and value > ceiling:
            return f"{METRICS[metric].abbrev} {value:.1f} > {ceiling:.1f}"
    return None


# the start of `choose`'s reason when the guard kept nothing; the ledger (scripts/make_verdicts.py) reads it
NO_SETTING_KEPT = "no setting within the guard"


def choose(
    settings: list[dict[str, Any]], group: list[str], paper: str | None, tie: float
) -> tuple[str | None, str]:
    """(the chosen defense, why) among scored settings, each {"defense", "hs", "kept", ...}."""
    kept = [s for s in settings if s["kept"]]
    if not kept:
        if paper is not None:
            return paper, f"{NO_SETTING_KEPT}: the paper's value"
        return None, f"{NO_SETTING_KEPT}, and no paper's value to fall back on"
    best = min(s["hs"] for s in kept)
    tied = [s["defense"] for s in kept if s["hs"] <= best + tie]
    if len(tied) == 1:
        return tied[0], "lowest HS"
    if paper in tied:
        return paper, f"tie within {tie:g} points: the paper's value"
    return min(tied, key=group.index), f"tie within {tie:g} points: the mildest"


def calibrate(rows: list[dict[str, Any]], sweep: SweepConfig) -> list[dict[str, Any]]:
    """Per grid slice and knob: every setting's means, whether each reference's guard keeps it, and the choice."""
    rule = sweep.calibration
    if rule is None or sweep.baseline is None:
        return []
    final: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    aligned: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        # an unfinished run's last point may be its aligned model: only finished runs are settings
        if r["final"] and r["complete"] and r["p"] is not None:
            final[_slice_of(r)][r["defense"]].append(r)
        if r["stage"] == "align":
            aligned[_slice_of(r)][r["defense"]].append(r)
    out = []
    for key, by_defense in final.items():
        if sweep.baseline not in by_defense:
            continue
        base = _means(by_defense[sweep.baseline])
        before = aligned.get(key, {})
        base_before = _means(before[sweep.baseline]) if before.get(sweep.baseline) else None
        references = {"baseline": base, "aligned": base_before}
        for group, members in rule.groups.items():
            entry = _group_entry(rule, group, members, by_defense, before, references)
            if entry is not None:
                out.append({"slice": dict(key), **entry})
    return out


def _group_entry(
    rule: CalibrationConfig,
    group: str,
    members: list[str],
    by_defense: dict[str, list[dict[str, Any]]],
    before: dict[str, list[dict[str, Any]]],
    references: dict[str, dict[str, float | None] | None],
) -> dict[str, Any] | None:
    scored = [
        {
            "defense": d,
            "seeds": len(by_defense[d]),
            **_means(by_defense[d]),
            "pre_attack_hs": _means(before[d])["harmful_score"] if before.get(d) else None,
        }
        for d in members
        if d in by_defense
    ]
    if not scored:
        return None
    base, base_before = references["baseline"], references["aligned"]
    assert base is not None
    pre_attack = None
    if rule.max_pre_attack_hs_gap is not None:
        target = None if base_before is None else base_before["harmful_score"]
        pre_attack = (target, rule.max_pre_attack_hs_gap)
    fa = base["finetune_accuracy"]
    floor_fa = None if fa is None else fa - rule.max_fa_drop
    choices = {}
    for name in rule.references:
        ref = references[name]
        if ref is None:
            choices[name] = {
                "chosen": None,
                "why": "the baseline's aligned model was not evaluated",
                "guard": {},
            }
            continue
        ceilings = {
            m: None if ref[m] is None else ref[m] + getattr(rule, attr) for m, attr in CEILINGS.items()
        }
        settings = [
            {
                "defense": s["defense"],
                "hs": s["harmful_score"],
                "dropped_because": _verdict(s, floor_fa, ceilings, pre_attack),
            }
            for s in scored
        ]
        for s in settings:
            s["kept"] = s["dropped_because"] is None
        chosen, why = choose(settings, members, rule.paper.get(group), rule.tie)
        choices[name] = {
            "chosen": chosen,
            "why": why,
            "guard": {"min_fa": floor_fa, **{f"max_{m}": c for m, c in ceilings.items()}},
            "dropped": {s["defense"]: s["dropped_because"] for s in settings if not s["kept"]},
        }
    return {
        "knob": group,
        "paper": rule.paper.get(group),
        "settings": scored,
        "missing": [d for d in members if d not in by_defense],
        "choices": choices,
    }


REFERENCE_WORDS = {
    "baseline": "refusal ceilings from the baseline after the attack",
    "aligned": "refusal ceilings from the baseline's aligned model, before the attack",
}


def calibration_markdown(sweep: SweepConfig, entries: list[dict[str, Any]]) -> list[str]:
    rule = sweep.calibration
    if not entries or rule is None:
        return []
    matched = ""
    if rule.max_pre_attack_hs_gap is not None:
        matched = (
            f"whose aligned model's HS lies within ±{rule.max_pre_attack_hs_gap:g} points of `{sweep.baseline}`'s "
            "aligned model (column HS before) and "
        )
    lines = [
        "## Calibration: the setting each defense keeps",
        "",
        f"The rule (written before the run): keep the settings {matched}with FA ≥ `{sweep.baseline}`'s − "
        f"{rule.max_fa_drop:g}, over-refusal ≤ the reference's + {rule.max_over_refusal_rise:g} and instruction "
        f"refusal ≤ the reference's + {rule.max_instruction_refusal_rise:g}; among them the lowest HS; within "
        f"{rule.tie:g} points the paper's value, then the mildest; none kept: the paper's value, marked. "
        "Means over seeds at each run's final point. References: "
        + "; ".join(f"**{name}**: {REFERENCE_WORDS[name]}" for name in rule.references)
        + " (the first is the rule).",
        "",
    ]
    for entry in entries:
        slice_text = ", ".join(f"{k.split('.', 1)[1]} = {v}" for k, v in entry["slice"].items())
        heading = f"**{entry['knob']}**" + (f" ({slice_text})" if slice_text else "")
        lines += [heading, ""]
        refs = list(entry["choices"])
        before = any(s["pre_attack_hs"] is not None for s in entry["settings"])
        columns = ["setting", *(["HS before"] if before else []), "HS", "FA", "OR", "IR", "seeds"]
        columns += [f"{r} guard" for r in refs]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for s in entry["settings"]:
            marks = []
            for ref in refs:
                choice = entry["choices"][ref]
                why = choice.get("dropped", {}).get(s["defense"])
                if choice["chosen"] == s["defense"]:
                    mark = "**chosen**" if why is None else f"**chosen** (outside the guard: {why})"
                else:
                    mark = "kept" if why is None else why
                marks.append(mark)
            paper = " (paper)" if s["defense"] == entry["paper"] else ""
            values = " | ".join(fmt(s[m]) for m in (("pre_attack_hs",) if before else ()) + READ)
            lines.append(f"| {s['defense']}{paper} | {values} | {s['seeds']} | " + " | ".join(marks) + " |")
        for ref in refs:
            choice = entry["choices"][ref]
            lines.append(f"\n{ref}: {choice['chosen'] or '–'} ({choice['why']})")
        if entry["missing"]:
            lines.append(f"\nNot run yet: {', '.join(entry['missing'])}.")
        lines.append("")
    return lines
