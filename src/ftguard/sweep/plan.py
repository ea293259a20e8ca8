"""`ftguard sweep --dry-run`: the runs, the units they share, and the estimated GPU hours, without any work.

Units are counted from the config sections each stage reads (the real store keys hash the data too, which a
dry run does not load), so the count is what a sweep trains when its data are the usual disjoint layout.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ftguard.sweep.config import SweepConfig, SweepRun


def _key(run: SweepRun, *parts: str) -> str:
    return run.config.fingerprint(*parts)


def unit_plan(runs: list[SweepRun]) -> dict[str, dict[str, tuple[SweepRun, float | None]]]:
    """Distinct units by kind → {unit key: (a run that needs it, harmful ratio)}."""
    from ftguard.pipeline.run import finetune_keys

    units: dict[str, dict[str, tuple[SweepRun, float | None]]] = {
        k: {} for k in ("align", "finetune", "post", "eval")
    }
    for run in runs:
        cfg = run.config
        d = cfg.to_dict()
        data_align = {"root": d["data"]["root"], "alignment": d["data"]["alignment"]}
        data_align["reserve"] = d["data"]["finetune"]["harmful_reserve"]
        align = (_key(run, "seed", "model", "adapter", "align"), repr(data_align)) if cfg.align else "base"
        points = set(cfg.evaluate.points)
        if cfg.align is not None:
            units["align"].setdefault(repr(align), (run, None))
            if "align" in points:
                units["eval"].setdefault(repr(("align", align, d["data"]["finetune"]["task"])), (run, None))
        if "base" in points:
            units["eval"].setdefault(repr(("base", d["model"], d["data"]["finetune"]["task"])), (run, None))
        if cfg.finetune is None:
            continue
        for _, p in finetune_keys(cfg).items():
            ft = (align, _key(run, "seed", "model", "adapter", "finetune"), repr(d["data"]["finetune"]), p)
            units["finetune"].setdefault(repr(ft), (run, p))
            if "finetune" in points:
                units["eval"].setdefault(repr(("finetune", ft)), (run, p))
            if cfg.post is not None:
                post = (ft, _key(run, "post"))
                units["post"].setdefault(repr(post), (run, p))
                if "post" in points:
                    units["eval"].setdefault(repr(("post", post)), (run, p))
    return units


def dry_run(sweep: SweepConfig, runs: list[SweepRun]) -> dict[str, Any]:
    from ftguard.estimate import eval_cost, gpu_spec, stage_cost

    gpu = gpu_spec(sweep.gpu)
    units = unit_plan(runs)
    hours: Counter[str] = Counter()
    for kind, found in units.items():
        for run, _p in found.values():
            cost = eval_cost(run.config, gpu) if kind == "eval" else stage_cost(run.config, kind, gpu)
            hours[kind] += cost["gpu_hours"]
    return {
        "name": sweep.name,
        "runs": len(runs),
        "defenses": list(sweep.defenses),
        "grid": sweep.grid,
        "attack": sweep.attack.grid if sweep.attack else {},
        "seeds": sorted({r.seed for r in runs}),
        "units": {k: len(v) for k, v in units.items()},
        "units_without_sharing": _unshared(runs),
        "gpu": gpu.describe(),
        "gpu_hours": {k: round(v, 2) for k, v in hours.items()},
        "gpu_hours_total": round(sum(hours.values()), 2),
    }


def _unshared(runs: list[SweepRun]) -> int:
    total = 0
    for run in runs:
        total += unit_count_of(run)
    return total


def unit_count_of(run: SweepRun) -> int:
    from ftguard.pipeline.run import finetune_keys

    cfg = run.config
    n_ft = len(finetune_keys(cfg)) if cfg.finetune is not None else 0
    per_ft = 1 + (1 if cfg.post is not None else 0)
    evals = len(set(cfg.evaluate.points))
    return (1 if cfg.align is not None else 0) + n_ft * per_ft + evals


def describe(plan: dict[str, Any]) -> str:
    units = plan["units"]
    lines = [
        f"sweep {plan['name']}: {plan['runs']} runs = {len(plan['defenses'])} defenses × "
        + " × ".join(f"{len(v)} {k.split('.')[-1]}" for k, v in {**plan["grid"], **plan["attack"]}.items())
        + f" × {len(plan['seeds'])} seeds",
        f"  defenses: {', '.join(plan['defenses'])}",
        "  units to train/evaluate (shared across runs): "
        + ", ".join(f"{k} {v}" for k, v in units.items())
        + f" (about {plan['units_without_sharing']} without sharing)",
        f"  estimated GPU hours on {plan['gpu']}: "
        + ", ".join(f"{k} {v:g}" for k, v in plan["gpu_hours"].items())
        + f"; total {plan['gpu_hours_total']:g}",
    ]
    return "\n".join(lines)
