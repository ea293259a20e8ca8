"""The aggregate of a sweep: every evaluated point as a row, and the papers' table (mean ± std over seeds).

The table scores each run at its *final* point: the repaired model when the run has a post stage, else the
fine-tuned one (the model the provider would serve). Columns are the harmful ratios and their average; the
average is taken per seed over the ratios, then mean ± std over the seeds that have every ratio. Std is the
sample standard deviation (n − 1); with one seed it is left out.

Adaptive attacks: for each defense (and each value of the other grid axes), every attack setting is scored by
its mean over seeds; the capability guard drops settings whose FA falls too far (a user would notice a
fine-tune that wrecks the task), and the worst case is the kept setting with the highest mean HS.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ftguard.evaluation.stats import difference_interval
from ftguard.pipeline.outputs import read_json, write_json_atomic, write_text_atomic
from ftguard.sweep.config import ABBREVIATIONS, RATIO_KEY, SweepConfig, SweepRun

METRICS = {
    "harmful_score": "HS",
    "harmful_score_plus": "HS+",
    "finetune_accuracy": "FA",
    "over_refusal": "over-refusal",
}


def collect(runs: list[SweepRun]) -> list[dict[str, Any]]:
    """One row per evaluated point of every run that has results (complete or not)."""
    rows = []
    for run in runs:
        path = run.config.out_dir / "results.json"
        if not path.is_file():
            continue
        results = read_json(path)
        stages = results.get("stages", {})
        final = _final_keys(stages)
        for key, entry in stages.items():
            rows.append(
                {
                    "run": run.id,
                    "defense": run.defense,
                    "seed": run.seed,
                    **{f"grid.{k}": v for k, v in run.axes.items()},
                    **{f"attack.{k}": v for k, v in run.attack.items()},
                    "point": key,
                    "final": key in final,
                    "stage": entry.get("stage"),
                    "method": entry.get("method"),
                    "p": entry.get("harmful_ratio"),
                    **{m: entry.get(m) for m in METRICS},
                    # (flagged, asked) behind each rate: what the baseline comparison pools over seeds
                    **{f"{m}_k": (entry.get("counts") or {}).get(m, [None, None])[0] for m in METRICS},
                    **{f"{m}_n": (entry.get("counts") or {}).get(m, [None, None])[1] for m in METRICS},
                    "degenerate_rate": entry.get("degenerate_rate"),
                    "judge": entry.get("judge"),
                    "complete": bool(results.get("complete")),
                }
            )
    return rows


def _final_keys(stages: dict[str, Any]) -> set[str]:
    for stage in ("post", "finetune", "align", "base"):
        keys = {k for k, e in stages.items() if e.get("stage") == stage}
        if keys:
            return keys
    return set()


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _marked(values: list[float], versus: dict[str, Any] | None) -> str:
    text = _cell(values)
    return text if versus is None or not values else f"{text} {versus['mark']}"


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
        key = _slice_key(r, {f"grid.{RATIO_KEY}", f"attack.{RATIO_KEY}"})
        slices[key][r["defense"]][float(r["p"])][r["seed"]] = {
            **{m: r[m] for m in METRICS if r[m] is not None},
            **{f"{m}_counts": (r[f"{m}_k"], r[f"{m}_n"]) for m in METRICS if r.get(f"{m}_n")},
        }
    out = []
    for key, defenses in slices.items():
        # The sweep's own ratios when it declares them: a missing one shows as "–" and leaves no average.
        declared = [
            *sweep.grid.get(RATIO_KEY, []),
            *(sweep.attack.grid.get(RATIO_KEY, []) if sweep.attack else []),
        ]
        ratios = sorted({float(p) for p in declared} | {p for by_p in defenses.values() for p in by_p})
        table = {"slice": dict(key), "ratios": ratios, "defenses": {}}
        for defense in sweep.defenses:
            by_p = defenses.get(defense)
            if not by_p:
                continue
            entry: dict[str, Any] = {}
            for metric in METRICS:
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
    base = defenses[baseline]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for defense, by_p in defenses.items():
        if defense == baseline:
            continue
        out[defense] = {}
        for metric in METRICS:
            cells: dict[str, Any] = {}
            pooled_all = [0, 0, 0, 0]
            for p in ratios:
                pairs = [
                    (by_p[p][seed].get(f"{metric}_counts"), base[p][seed].get(f"{metric}_counts"))
                    for seed in sorted(set(by_p.get(p, {})) & set(base.get(p, {})))
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
            out[defense][metric] = cells
    return out


def _difference(k1: int, n1: int, k2: int, n2: int, seeds: int | None) -> dict[str, Any]:
    lower, upper = difference_interval(k1, n1, k2, n2)
    mark = "↓" if upper < 0 else "↑" if lower > 0 else "≈"
    return {"diff": 100.0 * (k1 / n1 - k2 / n2), "interval": [lower, upper], "mark": mark, "seeds": seeds}


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def worst_case(rows: list[dict[str, Any]], sweep: SweepConfig) -> list[dict[str, Any]]:
    """Per defense and grid slice: each attack setting's mean HS/FA, the guard's verdict, and the worst kept one."""
    if sweep.attack is None:
        return []
    guard = sweep.attack.capability_guard
    attack_keys = [f"attack.{k}" for k in sweep.attack.grid]
    groups: dict[tuple, dict[tuple, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["final"]:
            grid = tuple((k, r[k]) for k in sorted(r) if k.startswith("grid."))
            setting = tuple((k[len("attack.") :], r.get(k)) for k in attack_keys)
            groups[(r["defense"], grid)][setting].append(r)
    out = []
    for (defense, grid), settings in groups.items():
        scored = []
        for setting, rs in settings.items():
            hs = [r["harmful_score"] for r in rs if r["harmful_score"] is not None]
            fa = [r["finetune_accuracy"] for r in rs if r["finetune_accuracy"] is not None]
            scored.append(
                {
                    "setting": dict(setting),
                    "hs": statistics.fmean(hs) if hs else None,
                    "fa": statistics.fmean(fa) if fa else None,
                    "seeds": len(rs),
                }
            )
        best_fa = max((s["fa"] for s in scored if s["fa"] is not None), default=None)
        for s in scored:
            s["kept"], s["dropped_because"] = _guard(s["fa"], best_fa, guard)
        kept = [s for s in scored if s["kept"] and s["hs"] is not None]
        worst = max(kept, key=lambda s: s["hs"]) if kept else None
        out.append(
            {
                "defense": defense,
                "slice": dict(grid),
                "settings": scored,
                "worst": worst,
                "kept": len(kept),
                "total": len(scored),
            }
        )
    order = list(sweep.defenses)
    return sorted(out, key=lambda e: (order.index(e["defense"]), sorted(e["slice"].items(), key=str)))


def _guard(fa: float | None, best_fa: float | None, guard: Any) -> tuple[bool, str | None]:
    if fa is None:
        return False, "no FA"
    if guard.min_fa is not None and fa < guard.min_fa:
        return False, f"FA {fa:.1f} < min_fa {guard.min_fa:g}"
    if guard.max_fa_drop is not None and best_fa is not None and best_fa - fa > guard.max_fa_drop:
        return False, f"FA {fa:.1f} is {best_fa - fa:.1f} below the best {best_fa:.1f}"
    return True, None


# ------------------------------------------------------------------------------------------------ output


def markdown(
    sweep: SweepConfig, tables: list[dict[str, Any]], worst: list[dict[str, Any]], judge: str
) -> str:
    lines = [f"# Sweep `{sweep.name}`", ""]
    if sweep.description:
        lines += [sweep.description.strip(), ""]
    from ftguard.evaluation.judges.validated import validation_line

    lines += [
        f"Judge `{judge}`. Each cell: mean ± std over seeds (sample std) of the run's final point (after the post "
        "stage when there is one). avg: per seed over the ratios, then mean ± std.",
        "",
        *(validation_line(name) for name in judge.split(", ") if name != "?"),
        "",
    ]
    if sweep.baseline:
        lines += [
            f"↓ / ↑: below / above `{sweep.baseline}` beyond 95% (Newcombe interval of the difference of the counts "
            "pooled over the seeds both have; avg pools every ratio); ≈: within it. Pooling counts the same prompts "
            "under another seed as new samples, so this is a screening mark beside the seed spread, not a test.",
            "",
        ]
    for table in tables:
        if table["slice"]:
            lines += ["## " + ", ".join(f"{k.split('.', 1)[1]} = {v}" for k, v in table["slice"].items()), ""]
        cols = [f"p = {p:g}" for p in table["ratios"]] + ["avg"]
        for metric in METRICS:
            if not any(cell["n"] for entry in table["defenses"].values() for cell in entry[metric].values()):
                continue  # e.g. HS+ of results written before it existed
            lines += [f"**{METRICS[metric]}**", "", "| defense | " + " | ".join(cols) + " | seeds |"]
            lines.append("|---|" + "---|" * (len(cols) + 1))
            for defense, entry in table["defenses"].items():
                marks = table.get("versus", {}).get(defense, {}).get(metric, {})
                cells = [
                    _marked(entry[metric].get(col, {}).get("values", []), marks.get(col))
                    for col in [f"{p:g}" for p in table["ratios"]] + ["avg"]
                ]
                lines.append(f"| {defense} | " + " | ".join(cells) + f" | {len(entry['seeds'])} |")
            lines.append("")
    if sweep.reference and (sweep.reference.hs or sweep.reference.fa):
        lines += _reference_md(sweep)
    if worst:
        lines += _worst_md(sweep, worst)
    return "\n".join(lines) + "\n"


def _reference_md(sweep: SweepConfig) -> list[str]:
    ref = sweep.reference
    assert ref is not None
    lines = [
        f"## The paper's numbers ({ref.source})",
        "",
        "Not comparable unless model, judge and data match.",
        "",
    ]
    for metric, values in (("HS", ref.hs), ("FA", ref.fa)):
        if not values:
            continue
        cols = sorted({c for v in values.values() for c in v}, key=lambda c: (c == "avg", c))
        lines += [f"| {metric} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for defense, v in values.items():
            lines.append(f"| {defense} | " + " | ".join(_fmt(v.get(c)) for c in cols) + " |")
        lines.append("")
    return lines


def _worst_md(sweep: SweepConfig, worst: list[dict[str, Any]]) -> list[str]:
    guard = sweep.attack.capability_guard if sweep.attack else None
    rule = []
    if guard and guard.max_fa_drop is not None:
        rule.append(f"FA more than {guard.max_fa_drop:g} points below the defense's best setting")
    if guard and guard.min_fa is not None:
        rule.append(f"FA below {guard.min_fa:g}")
    lines = [
        "## Adaptive attack: worst case over the attack settings",
        "",
        f"Capability guard: settings with {' or '.join(rule) or 'no rule'} are dropped. Means over seeds.",
        "",
        "| defense | slice | worst HS | FA there | attack setting | kept / tried |",
        "|---|---|---|---|---|---|",
    ]
    for e in worst:
        slice_text = ", ".join(_axis(k.split(".", 1)[1], v) for k, v in e["slice"].items()) or "–"
        w = e["worst"]
        if w is None:
            lines.append(f"| {e['defense']} | {slice_text} | – | – | all dropped | 0 / {e['total']} |")
            continue
        setting = ", ".join(_axis(k, v) for k, v in w["setting"].items())
        lines.append(
            f"| {e['defense']} | {slice_text} | {w['hs']:.1f} | {_fmt(w['fa'])} | {setting} | "
            f"{e['kept']} / {e['total']} |"
        )
    return [*lines, ""]


def _axis(key: str, value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{ABBREVIATIONS.get(key, key.split('.')[-1])} = {text}"


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot(tables: list[dict[str, Any]], out: Path) -> list[Path]:
    """hs_vs_p.png (a line per defense, error bars = std over seeds) and hs_vs_fa.png (mean per defense × p)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if not tables:
        return paths
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 4), squeeze=False)
    fig2, axes2 = plt.subplots(1, len(tables), figsize=(5 * len(tables), 4), squeeze=False)
    for ax, ax2, table in zip(axes[0], axes2[0], tables, strict=True):
        title = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in table["slice"].items())
        for defense, entry in table["defenses"].items():
            ps = [p for p in table["ratios"] if entry["harmful_score"].get(f"{p:g}", {}).get("n")]
            hs = [entry["harmful_score"][f"{p:g}"] for p in ps]
            ax.errorbar(
                ps,
                [h["mean"] for h in hs],
                yerr=[h["std"] or 0 for h in hs],
                marker="o",
                capsize=3,
                label=defense,
            )
            fa = [entry["finetune_accuracy"].get(f"{p:g}", {}) for p in ps]
            points = [(h["mean"], f["mean"], p) for h, f, p in zip(hs, fa, ps, strict=True) if f.get("n")]
            if points:
                ax2.scatter([f for _, f, _ in points], [h for h, _, _ in points], label=defense)
                for h, f, p in points:
                    ax2.annotate(f"p={p:g}", (f, h), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="harmful ratio p", ylabel="HS (%) ↓", title=title or "HS vs p")
        ax.set_xticks(table["ratios"])
        ax2.set(xlabel="FA (%) ↑", ylabel="HS (%) ↓", title=title or "HS vs FA")
        for a in (ax, ax2):
            a.grid(alpha=0.3)
    for figure, name in ((fig, "hs_vs_p.png"), (fig2, "hs_vs_fa.png")):
        # One legend beside the panels: inside, ten defenses hide the points they label.
        handles, labels = figure.axes[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        figure.tight_layout()
        figure.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(figure)
        paths.append(out / name)
    return paths


def write_report(sweep: SweepConfig, runs: list[SweepRun], out: Path) -> dict[str, Any]:
    rows = collect(runs)
    tables = summarize(rows, sweep)
    worst = worst_case(rows, sweep)
    judges = sorted({r["judge"] for r in rows if r["judge"]})
    expected = len(runs)
    finished = len({r["run"] for r in rows if r["complete"]})
    report = {
        "name": sweep.name,
        "runs": expected,
        "complete_runs": finished,
        "complete": finished == expected,
        "judges": judges,
        "tables": tables,
        "worst_case": worst,
        "reference": to_plain(sweep.reference),
    }
    write_json_atomic(out / "runs.json", rows)
    write_text_atomic(out / "runs.csv", to_csv(rows))
    text = markdown(sweep, tables, worst, ", ".join(judges) or "?")
    if finished < expected:
        text += f"\n**Incomplete: {finished} of {expected} runs finished.**\n"
    write_text_atomic(out / "report.md", text)
    report["plots"] = [str(p) for p in plot(tables, out)]
    write_json_atomic(out / "report.json", report)
    report["markdown"] = text
    return report


def to_plain(obj: Any) -> Any:
    from ftguard.schema import to_dict

    value = to_dict(obj)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
