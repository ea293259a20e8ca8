"""The sweep's figures, drawn from its aggregate (sweep/aggregate.py) beside report.md: HS against p and against
FA, the attack curve, the worst case by attacks tried, and each defense's paired effects against the baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftguard.metrics import HEADLINE, METRICS, Metric
from ftguard.sweep.config import setting_text, slice_text

HS, FA = METRICS["harmful_score"], METRICS["finetune_accuracy"]
# every figure a sweep report may draw, in the order a page shows them
PLOT_FILES = ("hs_vs_p.png", "hs_vs_fa.png", "paired_effects.png", "attack_curve.png", "worst_case.png")


def _save(fig: Any, path: Path) -> Path:
    """Write the figure and free it: pyplot keeps every open figure alive, and a sweep report draws several."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def axis_label(metric: Metric) -> str:
    return f"{metric.label} ({metric.unit}) {metric.arrow}"


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
        # tab10 repeats after ten defenses (a study has fifteen rows): colour and marker together stay distinct
        for i, (defense, entry) in enumerate(table["defenses"].items()):
            style = {"color": f"C{i % 10}", "marker": "os^Dv"[i // 10 % 5]}
            ps = [p for p in table["ratios"] if entry["harmful_score"].get(f"{p:g}", {}).get("n")]
            hs = [entry["harmful_score"][f"{p:g}"] for p in ps]
            ax.errorbar(
                ps,
                [h["mean"] for h in hs],
                yerr=[h["std"] or 0 for h in hs],
                capsize=3,
                label=defense,
                **style,
            )
            fa = [entry["finetune_accuracy"].get(f"{p:g}", {}) for p in ps]
            points = [(h["mean"], f["mean"], p) for h, f, p in zip(hs, fa, ps, strict=True) if f.get("n")]
            if points:
                ax2.scatter([f for _, f, _ in points], [h for h, _, _ in points], label=defense, **style)
                for h, f, p in points:
                    # the defense's name at its point: fifteen colours in a legend are not told apart
                    text = defense if len(points) == 1 else f"{defense}, p={p:g}"
                    ax2.annotate(text, (f, h), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="harmful ratio p", ylabel=axis_label(HS), title=title or f"{HS.label} vs p")
        ax.set_xticks(table["ratios"])
        ax2.set(xlabel=axis_label(FA), ylabel=axis_label(HS), title=title or f"{HS.label} vs {FA.label}")
        for a in (ax, ax2):
            a.grid(alpha=0.3)
    for figure, name in ((fig, "hs_vs_p.png"), (fig2, "hs_vs_fa.png")):
        # One legend beside the panels: inside, ten defenses hide the points they label.
        handles, labels = figure.axes[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        paths.append(_save(figure, out / name))
    return paths


def plot_curve(curve: list[dict[str, Any]], out: Path) -> list[Path]:
    """attack_curve.png: HS at each attack setting, a line per p, one panel per defense."""
    if not curve:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defenses = list(dict.fromkeys(e["defense"] for e in curve))
    fig, axes = plt.subplots(1, len(defenses), figsize=(6 * len(defenses), 4), squeeze=False)
    for ax, defense in zip(axes[0], defenses, strict=True):
        entries = [e for e in curve if e["defense"] == defense]
        labels = [
            "\n".join(setting_text(k, v) for k, v in {**e["slice"], **e["setting"]}.items()) for e in entries
        ]
        for p in sorted({float(p) for e in entries for p in e["points"]}):
            ys = [e["points"].get(f"{p:g}", {}).get("harmful_score") for e in entries]
            ax.plot(
                range(len(entries)),
                [y if y is not None else float("nan") for y in ys],
                "o-",
                label=f"p={p:g}",
            )
        ax.set_xticks(range(len(entries)), labels, fontsize=7, rotation=45, ha="right")
        ax.set(ylabel=axis_label(HS), title=f"{defense}: {HS.label} by attack setting", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [_save(fig, out / "attack_curve.png")]


def plot_worst_case(worst: list[dict[str, Any]], out: Path) -> list[Path]:
    """worst_case.png: per defense (and grid slice), each kept attack setting's HS in the attack grid's order and
    the best so far (a step line): how much an attacker gains from each further attack he tries."""
    entries = [e for e in worst if e.get("cumulative_max")]
    if not entries:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(entries), figsize=(6 * len(entries), 4), squeeze=False)
    for ax, e in zip(axes[0], entries, strict=True):
        curve = e["cumulative_max"]
        xs = range(len(curve))
        ax.step(xs, [c["best_so_far"] for c in curve], where="post", label="best so far")
        ax.plot(xs, [c["hs"] for c in curve], "o", label="this setting")
        labels = ["\n".join(setting_text(k, v) for k, v in c["setting"].items()) for c in curve]
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=45, ha="right")
        title = ", ".join(
            [e["defense"], *(setting_text(k.split(".", 1)[1], v) for k, v in e["slice"].items())]
        )
        ax.set(ylabel=axis_label(HS), title=f"{title}: worst case by attacks tried", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [_save(fig, out / "worst_case.png")]


def paired_rows(tables: list[dict[str, Any]]) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(label, {metric: paired cell}) per defense with a paired effect, in the tables' order; the label names the
    grid slice and the p of the cell when a table pairs at several."""
    rows: list[tuple[str, dict[str, dict[str, Any]]]] = []
    for table in tables:
        by_column: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        for defense, by_metric in table.get("paired", {}).items():
            for metric, cells in by_metric.items():
                for column, cell in cells.items():
                    by_column.setdefault(column, {}).setdefault(defense, {})[metric] = cell
        where = slice_text(table)
        for column, defenses in by_column.items():
            # a defense still short of the others' seeds is marked: its interval is not yet the design's
            most = max(
                (c.get("seeds") or 0 for cells in defenses.values() for c in cells.values()), default=0
            )
            for defense, cells in defenses.items():
                label = [defense, *([where] if where != "–" else [])]
                label += [f"p = {column}"] if len(by_column) > 1 else []
                seeds = max((c.get("seeds") or 0 for c in cells.values()), default=0)
                text = ", ".join(label) + (f" ({seeds} of {most} seeds)" if 0 < seeds < most else "")
                rows.append((text, cells))
    return rows


def plot_paired(tables: list[dict[str, Any]], out: Path, baseline: str | None) -> list[Path]:
    """paired_effects.png: each defense's paired difference from the baseline with its 95% interval, a panel per
    metric and a row per defense (and grid slice, and p where a table pairs at several); a filled marker
    survives Holm's correction over the defenses of its column (the tables' †), a hollow one does not."""
    rows = paired_rows(tables)
    metrics = [m for m in HEADLINE if any(m in cells for _, cells in rows)]
    if not rows or not metrics:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 1.2 + 0.32 * len(rows)
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(3.2 * len(metrics) + 1.5, height), sharey=True, squeeze=False
    )
    ys = list(range(len(rows)))[::-1]  # the first row on top, in the table's order
    for ax, metric in zip(axes[0], metrics, strict=True):
        for y, (_, cells) in zip(ys, rows, strict=True):
            cell = cells.get(metric)
            if cell is None:
                continue
            lo, hi = cell["interval"]
            survives = cell.get("p_holm", 1.0) < 0.05
            ax.errorbar(
                cell["diff"],
                y,
                xerr=[[cell["diff"] - lo], [hi - cell["diff"]]],
                fmt="o",
                color="C0",
                mfc="C0" if survives else "white",
                capsize=2,
            )
        ax.axvline(0.0, color="0.5", linewidth=0.8)
        m = METRICS[metric]
        ax.set(title=f"{m.label} {m.arrow}", xlabel=f"defense − {baseline or 'baseline'} (points)")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(ys, [label for label, _ in rows], fontsize=8)
    fig.suptitle("Paired effects against the baseline, 95% intervals (filled: survives Holm)", fontsize=10)
    return [_save(fig, out / "paired_effects.png")]
