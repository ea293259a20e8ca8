"""Paired differences between two defenses of a sweep (or any two runs), at each evaluation point they share.

    python scripts/compare_runs.py runs/sweeps/X/runs/booster-lam5-s128-refresh2 \\
        runs/sweeps/X/runs/booster-lam5-s128 [--points align finetune]
    python scripts/compare_runs.py SUITE/runs/antidote SUITE/runs/sft --points finetune --only seed46

Each argument is a run folder (holding results.json) or a defense's folder of a sweep (holding one run folder per
seed). A sweep report pairs every defense against its baseline only; this pairs any two, e.g. a variant against
the setting it amortises. Runs pair by folder name (attack setting and seed, as a sweep names them) and rates
by their per-prompt outcomes: the two-level paired bootstrap of ``ftguard.evaluation.paired`` over the same seeds and
prompts. Outcomes over different prompts refuse to pair. Beside each difference: how many items the two score
differently (a difference of 0 can hide flips both ways), e.g. a post-stage defense's fine-tuned models against
the baseline's, made again on another machine (the second example).
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
    """{run label: results} of a run folder or of a defense's folder of runs (complete runs only). A sweep names
    a run folder by its attack setting and seed (``attack=virus-…-seed44``, or ``seed44``): runs pair when their
    folder names are equal."""
    if (folder / "results.json").is_file():
        paths = [folder / "results.json"]
    else:
        paths = sorted(folder.glob("*/results.json"))
    runs = {}
    for path in paths:
        results = json.loads(path.read_text())
        if results.get("complete"):
            label = f"seed{results.get('seed')}" if path.parent == folder else path.parent.name
            runs[label] = results
    if not runs:
        raise SystemExit(f"{folder}: no complete run (a run folder with results.json, or a folder of them)")
    return runs


def _point(results: dict, point: str, p: float | None) -> dict | None:
    """The stage entry of ``point``: ``align``, or ``finetune-p0.1`` / ``post-p0.1`` at ratio ``p`` (the run's
    only ratio when ``p`` is not given; several without it is an error)."""
    stages = results["stages"]
    if point in stages:
        return stages[point]
    keys = [k for k in stages if re.fullmatch(rf"{point}-p[0-9.e+-]+", k)]
    if p is not None:
        keys = [k for k in keys if float(k.split("-p", 1)[1]) == p]
    if len(keys) > 1:
        raise SystemExit(f"{point}: the runs hold {', '.join(keys)}: choose one ratio with --p")
    return stages[keys[0]] if keys else None


def compare(
    treated: Path, control: Path, points: list[str], p: float | None = None, only: str | None = None
) -> list[str]:
    """The table; ``only``: pair just the runs whose label holds it (``seed46``: one seed of a suite)."""
    a, b = _runs(treated), _runs(control)
    common = sorted(set(a) & set(b))
    if only is not None:
        common = [run for run in common if only in run]
    if not common:
        raise SystemExit(f"no run in common: {treated.name} has {sorted(a)}, {control.name} has {sorted(b)}")
    ratio = "" if p is None else f" at p = {p:g}"
    lines = [
        f"`{treated.name}` − `{control.name}`{ratio}, paired over {', '.join(common)} and the same prompts, in "
        "points [95% interval of the two-level bootstrap]; ↓/↑ when the interval excludes 0.",
        "",
        "| point | rate | treated | control | difference | detectable | items apart |",
        "|---|---|---|---|---|---|---|",
    ]
    for point in points:
        stages = [(_point(a[run], point, p), _point(b[run], point, p)) for run in common]
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
            # how many items the two score differently: a difference of 0 can hide many flips both ways
            apart = sum(
                x != y for run_t, run_c in zip(t, c, strict=True) for x, y in zip(run_t, run_c, strict=True)
            )
            lines.append(
                f"| {point} | {metric.label} | {mean_t:.1f} | {mean_c:.1f} | "
                f"{cell['diff']:+.1f} [{low:+.1f}, {high:+.1f}] {cell['mark']} | {cell['detectable']:.1f} | "
                f"{apart} of {sum(map(len, t))} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("treated", type=Path)
    parser.add_argument("control", type=Path)
    points = ["align", "finetune", "post"]
    parser.add_argument("--points", nargs="+", choices=points, default=points)
    parser.add_argument(
        "--p", type=float, help="the harmful ratio to read (needed when the runs hold several)"
    )
    parser.add_argument("--only", help="pair just the runs whose label holds this (e.g. seed46)")
    args = parser.parse_args(argv)
    sys.stdout.write("\n".join(compare(args.treated, args.control, args.points, args.p, args.only)) + "\n")


if __name__ == "__main__":
    main()
