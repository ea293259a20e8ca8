"""`ftguard compare`: one table across runs and an HS-vs-FA plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftguard.pipeline.results import METRIC_COLUMNS, _fmt
from ftguard.pipeline.run import load_results


def collect_rows(run_dirs: list[str]) -> list[dict[str, Any]]:
    rows = []
    for run_dir in run_dirs:
        results = load_results(run_dir)
        judge = (results.get("judge") or {}).get("name", "?")
        for key, entry in results.get("stages", {}).items():
            rows.append({"run": results.get("name", Path(run_dir).name), "key": key, "judge": judge, **entry})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    header = "| run | stage | method | p | judge | " + " | ".join(label for _, label in METRIC_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (5 + len(METRIC_COLUMNS))]
    for row in rows:
        p = row.get("harmful_ratio")
        cells = [row["run"], row["key"], row.get("method") or "–", "–" if p is None else f"{p:g}", row["judge"]]
        cells += [_fmt(row.get(m)) for m, _ in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    judges = {row["judge"] for row in rows}
    if len(judges) > 1:
        lines += ["", f"Warning: the runs use different judges ({', '.join(sorted(judges))}); their HS are not comparable."]
    return "\n".join(lines) + "\n"


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
            ax.scatter(fa, hs, color=color, marker=markers.get(row.get("stage"), "o"), s=48)
            ax.annotate(row["key"], (fa, hs), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.scatter([], [], color=color, label=run)
    ax.set_xlabel("fine-tune accuracy FA (%) →")
    ax.set_ylabel("harmful score HS (%) ↓")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    judges = sorted({row["judge"] for row in rows})
    ax.set_title(f"HS vs FA (judge: {', '.join(judges)}); ■ base ▲ aligned ● fine-tuned", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
