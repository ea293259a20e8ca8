"""What a planned study can detect, from a pilot sweep's per-prompt outcomes, written down before the study runs.

    python scripts/design_power.py sweeps/testbed-defense-calibration /path/to/its/output \\
        --seeds 5 --items harmful_score=200,finetune_accuracy=400,over_refusal=150,instruction_refusal=200

For each defense of the pilot and each rate, the share of prompts on which its outcome differs from the
baseline's (same seed, same p, same prompts) and the difference; from them, the paired difference the planned
design (seeds × items) detects with 80% power, as two bounds (``evaluation.paired.detectable_before_the_run``):
seeds that redraw every prompt's difference, and prompts whose difference repeats under every seed. Prints
markdown; the pilot's prompts are the validation slices, so this reads no test prompt.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from ftguard.evaluation.paired import decode_entry, detectable_before_the_run
from ftguard.metrics import HEADLINE, METRICS
from ftguard.sweep.aggregate import collect
from ftguard.sweep.config import expand, load_sweep


def pilot_pairs(
    sweep_name: str, output_dir: Path
) -> dict[str, dict[str, list[tuple[list[bool], list[bool]]]]]:
    """{defense: {metric: [(defense's outcomes, baseline's outcomes), ...]}} over the seeds and ratios both ran."""
    sweep, folder = load_sweep(sweep_name)
    if sweep.baseline is None:
        raise SystemExit(f"{sweep_name}: the sweep has no baseline to compare with")
    rows = [r for r in collect(expand(sweep, folder, output_dir)) if r["final"] and r["complete"]]
    by_key = {(r["defense"], r["seed"], r["p"]): r for r in rows}
    pairs: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for (defense, seed, p), row in by_key.items():
        base = by_key.get((sweep.baseline, seed, p))
        if defense == sweep.baseline or base is None:
            continue
        for metric in HEADLINE:
            a = (row.get("outcomes") or {}).get(metric)
            b = (base.get("outcomes") or {}).get(metric)
            if a and b and a["items"] == b["items"]:
                pairs[defense][metric].append((decode_entry(a), decode_entry(b)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", help="the pilot sweep (file or packaged name)")
    parser.add_argument("output_dir", type=Path, help="where the pilot ran")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the planned study")
    parser.add_argument(
        "--items",
        default="harmful_score=200,harmful_score_plus=200,finetune_accuracy=400,over_refusal=150,"
        "instruction_refusal=200",
        help="items per seed of each rate in the planned study, metric=n,...",
    )
    args = parser.parse_args()
    items = {k: int(v) for k, v in (part.split("=") for part in args.items.split(","))}
    unknown = set(items) - set(HEADLINE)
    if unknown:
        raise SystemExit(f"--items: unknown rates {sorted(unknown)}; known: {', '.join(HEADLINE)}")
    pairs = pilot_pairs(args.sweep, args.output_dir)
    if not pairs:
        raise SystemExit(f"{args.output_dir}: no finished run pairs with the baseline on the same prompts")
    metrics = [m for m in HEADLINE if m in items]
    print(
        f"Planned: {args.seeds} seeds; items per seed "
        + ", ".join(f"{METRICS[m].abbrev} {items[m]}" for m in metrics)
        + ". Each cell: pilot discordance % / pilot difference (points) → detectable difference (points) at "
        "80% power, seeds redrawing every prompt … prompts repeating under every seed.\n"
    )
    print("| defense | " + " | ".join(METRICS[m].abbrev for m in metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for defense, by_metric in pairs.items():
        cells = []
        for metric in metrics:
            runs = by_metric.get(metric)
            if not runs:
                cells.append("–")
                continue
            disc = statistics.fmean(sum(x != y for x, y in zip(a, b, strict=True)) / len(a) for a, b in runs)
            diff = statistics.fmean((sum(a) - sum(b)) / len(a) for a, b in runs)
            low, high = detectable_before_the_run(disc, diff, items[metric], args.seeds)
            cells.append(f"{100 * disc:.0f} / {100 * diff:+.0f} → {low:.1f} … {high:.1f}")
        print(f"| {defense} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
