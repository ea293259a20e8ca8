"""Paired differences between two defenses of a sweep (or any two runs), at each evaluation point they share.

    python scripts/compare_runs.py runs/sweeps/X/runs/booster-lam5-s128-refresh2 \\
        runs/sweeps/X/runs/booster-lam5-s128 [--points align finetune]

Each argument is a run folder (holding results.json) or a defense's folder of a sweep (holding one run folder per
seed). A sweep report pairs every defense against its baseline only; this pairs any two, e.g. a variant against
the setting it amortises. Runs pair by seed (the folder name's trailing ``seedN``) and rates by their
per-prompt outcomes: the two-level paired bootstrap of ``ftguard.evaluation.paired`` over the same seeds and
prompts. Outcomes over different prompts refuse to pair.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ftguard.evaluation.paired import decode_entry, paired_bootstrap
from ftguard.metrics import METRICS


def _runs(folder: Path) -> dict[str, dict]:
    """{seed label: results} of a run folder or of a defense's folder of seed runs (complete runs only)."""
    paths = (
        [folder / "results.json"]
        if (folder / "results.json").is_file()
        else sorted(folder.glob("*/results.json"))
    )
    runs = {}
    for path in paths:
        results = json.loads(path.read_text())
        if results.get("complete"):
            match = re.search(r"seed(\d+)$", path.parent.name)
            runs[match.group(1) if match else str(results.get("seed"))] = results
    if not runs:
        raise SystemExit(f"{folder}: no complete run (a run folder with results.json, or a folder of them)")
    return runs


def _point(results: dict, point: str) -> dict | None:
    """The stage entry of ``point`` (``finetune`` matches ``finetune-p0.1``: one ratio per run)."""
    return next((v for k, v in results["stages"].items() if k == point or k.startswith(f"{point}-")), None)


def compare(treated: Path, control: Path, points: list[str]) -> list[str]:
    a, b = _runs(treated), _runs(control)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise SystemExit(f"no seed in common: {treated.name} has {sorted(a)}, {control.name} has {sorted(b)}")
    lines = [
        f"`{treated.name}` − `{control.name}`, paired over seeds {', '.join(seeds)} and the same prompts, in points "
        "[95% interval of the two-level bootstrap]; ↓/↑ when the interval excludes 0.",
        "",
        "| point | rate | treated | control | difference | detectable |",
        "|---|---|---|---|---|---|",
    ]
    for point in points:
        stages = [(_point(a[s], point), _point(b[s], point)) for s in seeds]
        if any(x is None or y is None for x, y in stages):
            continue
        for metric in METRICS.values():
            entries = [
                (x.get("outcomes", {}).get(metric.key), y.get("outcomes", {}).get(metric.key))
                for x, y in stages
            ]
            if any(e is None or f is None for e, f in entries):
                continue
            if any(e["items"] != f["items"] for e, f in entries):
                raise SystemExit(f"{point} {metric.key}: the two runs' outcomes are over different prompts")
            t = [decode_entry(e) for e, _ in entries]
            c = [decode_entry(f) for _, f in entries]
            cell = paired_bootstrap(t, c)
            low, high = cell["interval"]
            mean_t = 100 * sum(map(sum, t)) / sum(map(len, t))
            mean_c = 100 * sum(map(sum, c)) / sum(map(len, c))
            lines.append(
                f"| {point} | {metric.label} | {mean_t:.1f} | {mean_c:.1f} | "
                f"{cell['diff']:+.1f} [{low:+.1f}, {high:+.1f}] {cell['mark']} | {cell['detectable']:.1f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("treated", type=Path)
    parser.add_argument("control", type=Path)
    parser.add_argument("--points", nargs="+", default=["align", "finetune", "post"])
    args = parser.parse_args(argv)
    sys.stdout.write("\n".join(compare(args.treated, args.control, args.points)) + "\n")


if __name__ == "__main__":
    main()
