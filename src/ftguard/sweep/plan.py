"""`ftguard sweep --dry-run`: the runs, the units they share, and the estimated GPU hours, without any training.

The units are those the runs will make: each run's unit graph (ftguard.pipeline.units.build_graph, the function
`ftguard run` walks) with its real fingerprints, so a dry run loads the data (no model) and counts a unit shared
by several runs once, exactly as the unit store will. Where the data are not on this machine (a cluster's data
root), the units are keyed by the config that selects the data instead, and the printout says so.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ftguard.pipeline.units import Unit, estimate_graph
from ftguard.sweep.config import SweepConfig, SweepRun

KINDS = ("align", "finetune", "post", "eval")


def dry_run(sweep: SweepConfig, runs: list[SweepRun], reused: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``reused``: ids of runs that `--reuse` would copy from another sweep; they make no unit."""
    from ftguard.cost import gpu_spec
    from ftguard.estimate import eval_cost, stage_cost

    gpu = gpu_spec(sweep.gpu)
    graphs: list[tuple[SweepRun, list[Unit]]] = []
    missing: str | None = None
    for run in (r for r in runs if r.id not in reused):
        run_units, why = estimate_graph(run.resolved)
        graphs.append((run, run_units))
        missing = missing or why
    units: dict[str, dict[str, SweepRun]] = {k: {} for k in KINDS}
    for run, run_units in graphs:
        for unit in run_units:
            units[unit.kind].setdefault(unit.fingerprint, run)
    hours: Counter[str] = Counter()
    for kind, found in units.items():
        for run in found.values():
            cost = eval_cost(run.resolved, gpu) if kind == "eval" else stage_cost(run.resolved, kind, gpu)
            hours[kind] += cost["gpu_hours"]
    return {
        "name": sweep.name,
        "runs": len(runs),
        "reused": len(reused),
        # the selected ones (--defenses, --seeds), so that the header's product is the runs shown
        "defenses": [d for d in sweep.defenses if any(r.defense == d for r in runs)],
        "grid": sweep.grid,
        "attack": sweep.attack.grid if sweep.attack else {},
        "attack_settings": sweep.attack.settings if sweep.attack else [],
        "seeds": sorted({r.seed for r in runs}),
        "units": {k: len(v) for k, v in units.items()},
        "units_without_sharing": sum(len(run_units) for _, run_units in graphs),
        # None when every run's data were read; else why units were counted from the config alone
        "units_from_config": missing,
        "gpu": gpu.describe(),
        "gpu_hours": {k: round(v, 2) for k, v in hours.items()},
        "gpu_hours_total": round(sum(hours.values()), 2),
    }


def describe(plan: dict[str, Any]) -> str:
    units = plan["units"]
    lines = [
        f"sweep {plan['name']}: {plan['runs']} runs = "
        + " × ".join(
            [
                f"{len(plan['defenses'])} defenses",
                *(f"{len(v)} {k.split('.')[-1]}" for k, v in plan["grid"].items()),
                *_attack_factors(plan),
                f"{len(plan['seeds'])} seeds",
            ]
        ),
        f"  defenses: {', '.join(plan['defenses'])}",
        *(
            [
                f"  {plan['reused']} run(s) copied from --reuse folders (same config finished there): no unit made"
            ]
            if plan.get("reused")
            else []
        ),
        "  units to train/evaluate (shared across runs): "
        + ", ".join(f"{k} {v}" for k, v in units.items())
        + f" (about {plan['units_without_sharing']} without sharing)",
        *(
            [
                f"  data not on this machine ({plan['units_from_config']}): units counted from the config that selects it"
            ]
            if plan.get("units_from_config")
            else []
        ),
        f"  estimated GPU hours on {plan['gpu']}: "
        + ", ".join(f"{k} {v:g}" for k, v in plan["gpu_hours"].items())
        + f"; total {plan['gpu_hours_total']:g}",
    ]
    return "\n".join(lines)


def _attack_factors(plan: dict[str, Any]) -> list[str]:
    """The attack's share of the run count: one factor per grid axis, or, with listed settings beside the grid,
    their total (the settings are not a product)."""
    axes = plan["attack"]
    if not plan.get("attack_settings"):
        return [f"{len(v)} {k.split('.')[-1]}" for k, v in axes.items()]
    combinations = 1
    for values in axes.values():
        combinations *= len(values)
    return [f"{combinations + len(plan['attack_settings'])} attack settings"]
