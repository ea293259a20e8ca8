"""`ftguard compare`: one table across runs and an HS-vs-FA plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftguard.evaluation.stats import within_noise
from ftguard.metrics import INTERVAL_NOTE, METRICS, RUN_TABLE, cell
from ftguard.run_results import read_results

NOISE_MARK = " ≈"


def collect_rows(run_dirs: list[str]) -> list[dict[str, Any]]:
    """One row per evaluated point of each run: the point's entry in results.json, with its run and key."""
    rows = []
    for run_dir in run_dirs:
        run = read_results(run_dir)
        for point in run.points.values():
            rows.append(
                {
                    "run": run.name or Path(run_dir).name,
                    "key": point.key,
                    "judge": run.judge or "?",
                    **point.entry,
                }
            )
    return rows


def noise_marks(rows: list[dict[str, Any]]) -> dict[tuple[int, str], bool]:
    """(row index, metric) → True where the row's rate is within noise of the same point of the first run.

    Points are matched by stage key (base, align, finetune-p0.1, ...); the first run listed is the reference.
    """
    reference: dict[str, dict[str, Any]] = {}
    marks = {}
    for i, row in enumerate(rows):
        ref = reference.setdefault(row["key"], row)
        if ref is row:
            continue
        for metric in RUN_TABLE:
            a, b = (ref.get("counts") or {}).get(metric), (row.get("counts") or {}).get(metric)
            if a and b:
                marks[(i, metric)] = within_noise(a[0], a[1], b[0], b[1])
    return marks


def markdown(rows: list[dict[str, Any]]) -> str:
    header = "| run | stage | method | p | judge | " + " | ".join(METRICS[m].column for m in RUN_TABLE) + " |"
    lines = [header, "|" + "---|" * (5 + len(RUN_TABLE))]
    marks = noise_marks(rows)
    for i, row in enumerate(rows):
        p = row.get("harmful_ratio")
        cells = [
            row["run"],
            row["key"],
            row.get("method") or "–",
            "–" if p is None else f"{p:g}",
            row["judge"],
        ]
        cells += [
            cell(row.get(m), (row.get("intervals") or {}).get(m)) + (NOISE_MARK if marks.get((i, m)) else "")
            for m in RUN_TABLE
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", INTERVAL_NOTE]
    if marks:
        first = rows[0]["run"]
        lines.append(
            f"≈: within noise of the same stage of `{first}` (Newcombe 95% interval of the difference contains 0)."
        )
    judges = {row["judge"] for row in rows}
    if len(judges) > 1:
        lines += [
            "",
            f"Warning: the runs use different judges ({', '.join(sorted(judges))}); their HS are not comparable.",
        ]
    # FA by label match and FA as a judge's win rate (or by two judges) are different measurements
    scorings = {_fa_scoring(row) for row in rows if row.get("finetune_accuracy") is not None}
    if len(scorings) > 1:
        lines += [
            "",
            f"Warning: FA is scored differently ({', '.join(sorted(scorings))}); their FA are not comparable.",
        ]
    return "\n".join(lines) + "\n"


def _fa_scoring(row: dict[str, Any]) -> str:
    rule = str(row.get("task_rule") or "?")
    judge = row.get("finetune_accuracy_judge")
    return f"{rule} by {judge.get('name')} {judge.get('model') or ''}".strip() if judge else rule


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    runs = sorted({row["run"] for row in rows})
    markers = {"base": "s", "align": "^", "finetune": "o"}
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for row in (r for r in rows if r["run"] == run):
            fa, hs = row.get("finetune_accuracy"), row.get("harmful_score")
            if fa is None or hs is None:
                continue
            ax.scatter(fa, hs, color=color, marker=markers.get(row.get("stage"), "o"), s=48, zorder=3)
            intervals = row.get("intervals") or {}
            if "harmful_score" in intervals and "finetune_accuracy" in intervals:
                (h_lo, h_hi), (f_lo, f_hi) = intervals["harmful_score"], intervals["finetune_accuracy"]
                ax.errorbar(
                    fa,
                    hs,
                    yerr=[[hs - h_lo], [h_hi - hs]],
                    xerr=[[fa - f_lo], [f_hi - fa]],
                    color=color,
                    alpha=0.35,
                    linewidth=1,
                    capsize=2,
                )
            ax.annotate(row["key"], (fa, hs), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.scatter([], [], color=color, label=run)
    hs_m, fa_m = METRICS["harmful_score"], METRICS["finetune_accuracy"]
    ax.set_xlabel(f"{fa_m.title} {fa_m.label} ({fa_m.unit}) →")  # the arrow points along the axis
    ax.set_ylabel(f"{hs_m.title} {hs_m.label} ({hs_m.unit}) {hs_m.arrow}")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    judges = sorted({row["judge"] for row in rows})
    ax.set_title(
        f"HS vs FA (judge: {', '.join(judges)}); ■ base ▲ aligned ● fine-tuned; bars: 95% CI", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
