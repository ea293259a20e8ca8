"""The aggregate of a sweep, as data: every evaluated point as a row, and the papers' table (mean ± std over
seeds); sweep/report.py renders it.

The table scores each run at its *final* point (RunResults.final_points): the repaired model when the run has a
post stage, else the fine-tuned one (the model the provider would serve). Columns are the harmful ratios and
their average; the average is taken per seed over the ratios, then mean ± std over the seeds that have every
ratio. Std is the sample standard deviation (n − 1); with one seed it is left out.

Adaptive attacks: the attack curve (each setting's rates at every p) is here; the worst case over the settings is
in sweep/worst_case.py.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from ftguard.evaluation.paired import decode_entry, holm_family, paired_bootstrap, seed_level_t
from ftguard.evaluation.stats import difference_interval
from ftguard.metrics import (
    HEADLINE,
)  # the rates the sweep tabulates per defense and marks against the baseline
from ftguard.run_results import read_results
from ftguard.sweep.attack_settings import RATIO_COLUMNS, attack_setting, grid_position, hashable
from ftguard.sweep.calibrate import calibrate
from ftguard.sweep.config import RATIO_KEY, SweepConfig, SweepRun, attack_cells
from ftguard.sweep.worst_case import worst_case


def collect(runs: list[SweepRun]) -> list[dict[str, Any]]:
    """One row per evaluated point of every run that has results (complete or not)."""
    rows = []
    for run in runs:
        path = run.config.out_dir / "results.json"
        if not path.is_file():
            continue
        results = read_results(path)
        final = results.final_keys()
        for point in results.points.values():
            rows.append(
                {
                    "run": run.id,
                    "defense": run.defense,
                    "seed": run.seed,
                    **{f"grid.{k}": hashable(v) for k, v in run.axes.items()},
                    **{f"attack.{k}": hashable(v) for k, v in run.attack.items()},
                    "point": point.key,
                    "final": point.key in final,
                    "stage": point.stage,
                    "method": point.method,
                    "p": point.harmful_ratio,
                    **{m: point.value(m) for m in HEADLINE},
                    # asked through the trigger the attack taught (docs/attacks.md): the attacker's own HS
                    "harmful_score_triggered": point.value("harmful_score_triggered"),
                    # (flagged, asked) behind each rate: what the baseline comparison pools over seeds
                    **{f"{m}_k": point.counts.get(m, (None, None))[0] for m in HEADLINE},
                    **{f"{m}_n": point.counts.get(m, (None, None))[1] for m in HEADLINE},
                    "degenerate_rate": point.value("degenerate_rate"),
                    "judge": point.judge,
                    "train_precision": train_precision(results.data),
                    "train_hardware": train_hardware(results.data),
                    "complete": results.complete,
                    # per-item outcomes (paired effects); aggregate() leaves them out of runs.json / runs.csv
                    "outcomes": point.entry.get("outcomes"),
                }
            )
    return rows


def train_precision(results: dict[str, Any]) -> str | None:
    """The precision(s) the run's trained units were made in (results.json ``trained``; None for runs written
    before it was recorded). A post-stage repair that only does weight arithmetic (Antidote, SafeLoRA, Recovery)
    records the dtype it computed in, not a training precision: counting its float32 beside a bf16-autocast
    fine-tune flagged every such run as mixed. A repair that trains says so in its report (one-shot safety)."""
    found = {
        t.get("precision")
        for key, t in (results.get("trained") or {}).items()
        if key != "post" or "precision" in (t.get("report") or {})
    } - {None}
    return " and ".join(sorted(found)) or None


def train_hardware(results: dict[str, Any]) -> str | None:
    """What the run's units were made on (results.json ``trained``; None for runs written before it was
    recorded), every unit's, post-stage arithmetic included."""
    found = {t.get("hardware") for t in (results.get("trained") or {}).values()} - {None}
    return " and ".join(sorted(found)) or None


def precisions(rows: list[dict[str, Any]], column: str = "train_precision") -> dict[str, int]:
    """{training precision (or another run-level ``column``): runs}, runs that did not record it under
    "not recorded"."""
    by_run = {r["run"]: r.get(column) or "not recorded" for r in rows}
    return dict(sorted(Counter(by_run.values()).items()))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _slice_key(row: dict[str, Any], skip: set[str]) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, row[k])
        for k in sorted(row)
        if (k.startswith("grid.") or k.startswith("attack.")) and k not in skip
    )


def summarize(rows: list[dict[str, Any]], sweep: SweepConfig) -> list[dict[str, Any]]:
    """Per slice (values of the axes other than p), per defense: mean ± std over seeds at each p and the average."""
    final = [r for r in rows if r["final"] and r["p"] is not None]
    slices: dict[tuple, dict[str, dict[float, dict[int, dict[str, float]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    for r in final:
        key = _slice_key(r, RATIO_COLUMNS)
        slices[key][r["defense"]][float(r["p"])][r["seed"]] = {
            **{m: r[m] for m in HEADLINE if r[m] is not None},
            **{f"{m}_counts": (r[f"{m}_k"], r[f"{m}_n"]) for m in HEADLINE if r.get(f"{m}_n")},
            **({"outcomes": r["outcomes"]} if r.get("outcomes") else {}),
        }
    out = []
    for key, defenses in slices.items():
        # The sweep's own ratios when it declares them: a missing one shows as "–" and leaves no average.
        declared = [
            *sweep.grid.get(RATIO_KEY, []),
            *(cell[RATIO_KEY] for cell in attack_cells(sweep.attack) if RATIO_KEY in cell),
        ]
        ratios = sorted({float(p) for p in declared} | {p for by_p in defenses.values() for p in by_p})
        table = {"slice": dict(key), "ratios": ratios, "defenses": {}}
        for defense in sweep.defenses:
            by_p = defenses.get(defense)
            if not by_p:
                continue
            entry: dict[str, Any] = {}
            for metric in HEADLINE:
                per_p = {p: [s[metric] for s in by_p[p].values() if metric in s] for p in ratios if p in by_p}
                seeds = set.intersection(*(set(by_p.get(p, {})) for p in ratios)) if ratios else set()
                avg = [
                    statistics.fmean(by_p[p][seed][metric] for p in ratios)
                    for seed in sorted(seeds)
                    if all(metric in by_p[p][seed] for p in ratios)
                ]
                entry[metric] = {
                    **{f"{p:g}": _stats(v) for p, v in per_p.items()},
                    "avg": _stats(avg),
                }
            entry["seeds"] = sorted({s for p in by_p for s in by_p[p]})
            table["defenses"][defense] = entry
        if sweep.baseline in defenses:
            table["versus"] = versus_baseline(defenses, sweep.baseline, ratios)
            paired = paired_versus_baseline(defenses, sweep.baseline, ratios)
            if any(cells for by_metric in paired.values() for cells in by_metric.values()):
                table["paired"] = paired
        out.append(table)
    return out


def versus_baseline(
    defenses: dict[str, dict[float, dict[int, dict[str, Any]]]], baseline: str, ratios: list[float]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Each defense against the baseline, per metric and p (and over all ratios, "avg"): the counts of both pooled
    over the seeds both have, the Newcombe 95% interval of the difference in points, and a mark: "↓" or "↑" when
    the interval excludes 0, "≈" when it does not.

    Pooling treats the same prompts under another seed as new samples, so the interval leaves out the uncertainty
    of which prompts were drawn: a screening mark beside the seed spread, not a test of the method."""
    return _each_against_baseline(
        defenses, baseline, lambda by_p, base, metric: _pooled(by_p, base, metric, ratios)
    )


def paired_versus_baseline(
    defenses: dict[str, dict[float, dict[int, dict[str, Any]]]], baseline: str, ratios: list[float]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Each defense against the baseline on the same prompts and seeds, per metric and p (and "avg" over the
    ratios, where every ratio's items count as items): the two-level paired bootstrap of
    ``evaluation.paired.paired_bootstrap``, with the difference the design can detect. Only seeds whose both runs
    recorded per-item outcomes over the same items enter; a cell without such a seed is left out.

    Each cell also gets ``p_holm``: its bootstrap p-value after Holm's correction over the defenses of its
    column (one metric at one p), since a dozen defenses read at 95% against one baseline would show about one
    null effect in twenty by chance. With two seeds or more, ``seed_t`` reads the same difference by Student's t over
    the seeds (``evaluation.paired.seed_level_t``: heavier tails than the bootstrap's with few seeds, the prompts
    taken as fixed), with its own ``p_holm`` over the same family."""
    paired = _each_against_baseline(
        defenses, baseline, lambda by_p, base, metric: _paired(by_p, base, metric, ratios)
    )
    columns = {(metric, col) for cells in paired.values() for metric in cells for col in cells[metric]}
    for metric, col in columns:
        holm_family({d: cells[metric][col] for d, cells in paired.items() if col in cells.get(metric, {})})
    return paired


def _each_against_baseline(
    defenses: dict[str, dict[float, dict[int, dict[str, Any]]]],
    baseline: str,
    cells_of: Callable[
        [dict[float, dict[int, dict[str, Any]]], dict[float, dict[int, dict[str, Any]]], str], dict
    ],
) -> dict[str, dict[str, dict[str, Any]]]:
    base = defenses[baseline]
    return {
        defense: {metric: cells_of(by_p, base, metric) for metric in HEADLINE}
        for defense, by_p in defenses.items()
        if defense != baseline
    }


def _shared_seeds(by_p: dict, base: dict, p: float) -> list[int]:
    return sorted(set(by_p.get(p, {})) & set(base.get(p, {})))


def _pooled(by_p: dict, base: dict, metric: str, ratios: list[float]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    pooled_all = [0, 0, 0, 0]
    for p in ratios:
        pairs = [
            (by_p[p][seed].get(f"{metric}_counts"), base[p][seed].get(f"{metric}_counts"))
            for seed in _shared_seeds(by_p, base, p)
        ]
        pairs = [(a, b) for a, b in pairs if a and b]
        if not pairs:
            continue
        k1, n1 = (sum(a[i] for a, _ in pairs) for i in (0, 1))
        k2, n2 = (sum(b[i] for _, b in pairs) for i in (0, 1))
        cells[f"{p:g}"] = _difference(k1, n1, k2, n2, len(pairs))
        pooled_all = [x + y for x, y in zip(pooled_all, (k1, n1, k2, n2), strict=True)]
    if len(cells) == len(ratios) and pooled_all[1] and pooled_all[3]:
        cells["avg"] = _difference(*pooled_all, None)
    return cells


def _paired(by_p: dict, base: dict, metric: str, ratios: list[float]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    arms: dict[float, dict[int, tuple[list[float], list[float]]]] = {}
    for p in ratios:
        arms[p] = {
            seed: pair
            for seed in _shared_seeds(by_p, base, p)
            if (pair := _paired_outcomes(by_p[p][seed], base[p][seed], metric)) is not None
        }
        # seeds evaluated on other prompts (another evaluate.harmful_prompts) do not pair with the rest
        if len({by_p[p][seed]["outcomes"][metric]["items"] for seed in arms[p]}) > 1:
            arms[p] = {}
        if arms[p]:
            cells[f"{p:g}"] = _bootstrap(list(arms[p].values()))
    common = set.intersection(*(set(a) for a in arms.values())) if arms else set()
    if len(ratios) > 1 and common:
        cells["avg"] = _bootstrap(
            [
                tuple(sum((list(arms[p][seed][arm]) for p in ratios), []) for arm in (0, 1))
                for seed in sorted(common)
            ]
        )
    return cells


def _paired_outcomes(
    treated: dict[str, Any], control: dict[str, Any], metric: str
) -> tuple[list[float], list[float]] | None:
    a = (treated.get("outcomes") or {}).get(metric)
    b = (control.get("outcomes") or {}).get(metric)
    if not a or not b or a["items"] != b["items"] or len(a["bits"]) != len(b["bits"]) or not a["bits"]:
        return None
    if a.get("scale", 1) != b.get("scale", 1):
        return None  # one metric scored two ways (a win rate and a match) does not pair
    return decode_entry(a), decode_entry(b)


def _bootstrap(pairs: list[tuple[list[float], list[float]]]) -> dict[str, Any]:
    treated, control = [a for a, _ in pairs], [b for _, b in pairs]
    cell = paired_bootstrap(treated, control)
    if (by_seed := seed_level_t(treated, control)) is not None:
        cell["seed_t"] = by_seed
    return cell


def _difference(k1: int, n1: int, k2: int, n2: int, seeds: int | None) -> dict[str, Any]:
    lower, upper = difference_interval(k1, n1, k2, n2)
    mark = "↓" if upper < 0 else "↑" if lower > 0 else "≈"
    return {"diff": 100.0 * (k1 / n1 - k2 / n2), "interval": [lower, upper], "mark": mark, "seeds": seeds}


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": values}


CURVE_METRICS = (*HEADLINE, "degenerate_rate")


def attack_curve(rows: list[dict[str, Any]], sweep: SweepConfig) -> list[dict[str, Any]]:
    """Per defense, grid slice (other than p) and attack setting, in the order of the attack grid: the mean over
    seeds of each headline rate and the degenerate rate at every p. Read along the settings, it is how strongly
    each attack moves the model: the curve from which a calibrated attack is chosen (docs/testbed.md)."""
    if sweep.attack is None:
        return []
    groups: dict[tuple, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["final"] and r["p"] is not None:
            grid = tuple((k, r[k]) for k in sorted(r) if k.startswith("grid.") and k not in RATIO_COLUMNS)
            setting = attack_setting(r, sweep, RATIO_COLUMNS)
            groups[(r["defense"], grid, setting)][float(r["p"])].append(r)
    order = list(sweep.defenses)
    setting_position = grid_position(sweep)

    def position(key: tuple) -> tuple:
        defense, grid, setting = key
        return (order.index(defense), str(grid), *setting_position(setting))

    out = []
    for key in sorted(groups, key=position):
        defense, grid, setting = key
        by_p = groups[key]
        out.append(
            {
                "defense": defense,
                "slice": dict(grid),
                "setting": dict(setting),
                "seeds": len({r["seed"] for rs in by_p.values() for r in rs}),
                "points": {
                    f"{p:g}": {
                        m: statistics.fmean(vals)
                        if (vals := [r[m] for r in by_p[p] if r[m] is not None])
                        else None
                        for m in CURVE_METRICS
                    }
                    for p in sorted(by_p)
                },
            }
        )
    return out


def aggregate(sweep: SweepConfig, runs: list[SweepRun]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(every point as a row, the report as data): what report.json holds, before any rendering."""
    rows = collect(runs)
    finished = len({r["run"] for r in rows if r["complete"]})
    report = {
        "name": sweep.name,
        "runs": len(runs),
        "complete_runs": finished,
        "complete": finished == len(runs),
        "judges": sorted({r["judge"] for r in rows if r["judge"]}),
        "train_precisions": precisions(rows),
        "train_hardware": precisions(rows, "train_hardware"),
        "tables": summarize(rows, sweep),
        "worst_case": worst_case(rows, sweep),
        "attack_curve": attack_curve(rows, sweep),
        "calibration": calibrate(rows, sweep),
        "reference": to_plain(sweep.reference),
    }
    return [{k: v for k, v in r.items() if k != "outcomes"} for r in rows], report


def to_plain(obj: Any) -> Any:
    from ftguard.schema import to_dict

    value = to_dict(obj)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
