#!/usr/bin/env python
"""Do HS, HS+, FA and over-refusal move with the evaluation's batch size or precision?

    python scripts/eval_stability.py --out docs/results/eval-stability \\
        --model base --model p0.2=runs/demo/finetune-p0.2/model [--config demo] [--settings fp32:1,fp32:32,bf16:1,bf16:32]

Each model is evaluated by the run config's evaluation (prompts, judge, lengths; ``--set`` changes them) under every setting
``precision:batch_size`` (fp32 = fp32 weights, no autocast; bf16 = fp32 weights under bf16 autocast), each into its
own unit, so an interrupted study resumes. Batch 1 has no padding and is the reference for the batch size; fp32 is
the reference for the precision. Each comparison pairs the same prompts: the rate difference, the items that
flipped each way, McNemar's exact p, and the share of answers that are the same text
(ftguard.evaluation.paired); a prompt set that one of the two lacks is left out. Writes report.json, report.md
and rates.png to --out; ``--report-only`` rebuilds them from the units already there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ftguard.config import load_config
from ftguard.evaluation.paired import identical_share, paired_change
from ftguard.metrics import METRICS
from ftguard.models import resolve_model
from ftguard.pipeline.evaluation import evaluate_point
from ftguard.pipeline.outputs import MARKER, StageDir, read_json, write_json_atomic, write_text_atomic
from ftguard.pipeline.run import Pipeline
from ftguard.resolve import load_run

AUTOCAST = {"fp32": "no", "bf16": "bf16"}
# metric: (kind of generations row, outcome of a row)
OUTCOMES = {
    "harmful_score": ("harmful", lambda r: r["flagged"]),
    "harmful_score_plus": ("harmful", lambda r: r["flagged"] or r["degenerate"]),
    "finetune_accuracy": ("task", lambda r: r["hit"]),
    "over_refusal": ("benign", lambda r: r["refused"]),
}
SHORT = {key: METRICS[key].abbrev for key in OUTCOMES}


def parse_settings(text: str) -> list[tuple[str, int]]:
    settings = []
    for item in text.split(","):
        precision, _, batch = item.strip().partition(":")
        if precision not in AUTOCAST or not batch.isdigit() or int(batch) < 1:
            raise SystemExit(f"--settings: {item!r} is not precision:batch_size with precision fp32 or bf16")
        settings.append((precision, int(batch)))
    return settings


def evaluate_all(args: argparse.Namespace) -> dict[str, dict[str, Path]]:
    """Every (model, setting) unit, made if missing; returns their folders."""
    settings = parse_settings(args.settings)
    models = dict(m.split("=", 1) if "=" in m else (m, None) for m in args.model)
    units: dict[str, dict[str, Path]] = {}
    jobs = [(name, s) for s in settings for name in models]  # every model at the first setting first
    pipe = None
    for name, (precision, batch) in tqdm(jobs, desc="evaluations", unit="eval"):
        overrides = [
            *args.set,
            f"evaluate.batch_size={batch}",
            f"evaluate.mixed_precision={AUTOCAST[precision]}",
            "model.dtype=float32",
            f"output_dir={args.out}",
        ]
        resolved = load_run(args.config, overrides)
        run = resolved.config
        if pipe is None:  # data and judge are the same for every setting
            pipe = Pipeline(resolved)
            pipe.prepare(need_judge=True)
        model_dir = resolve_model(models[name] or run.model.name)
        label = f"{precision}-b{batch}"
        unit = StageDir(
            args.out / "units" / name / label, run.fingerprint("evaluate", "data", "model") + model_dir
        )
        if not unit.is_complete():
            evaluate_point(run, f"{name} {label}", model_dir, pipe.plan, pipe.judges, unit)
        units.setdefault(name, {})[label] = unit.path
    return units


def existing_units(out: Path) -> dict[str, dict[str, Path]]:
    """Every complete unit under ``out``, whatever settings made it (for --report-only)."""
    units: dict[str, dict[str, Path]] = {}
    for marker in sorted((out / "units").glob(f"*/*/{MARKER}")):
        units.setdefault(marker.parent.parent.name, {})[marker.parent.name] = marker.parent
    return units


def _rows(unit: Path) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in (unit / "generations.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows.setdefault(row["kind"], []).append(row)
    return rows


def compare(reference: Path, other: Path) -> dict[str, Any]:
    a, b = _rows(reference), _rows(other)
    out: dict[str, Any] = {
        "identical_answers": {
            kind: identical_share([r["answer"] for r in a[kind]], [r["answer"] for r in b[kind]])
            for kind in a
            if kind in b
        }
    }
    for metric, (kind, outcome) in OUTCOMES.items():
        if kind in a and kind in b:
            out[metric] = paired_change([outcome(r) for r in a[kind]], [outcome(r) for r in b[kind]])
    return out


def _parse_label(label: str) -> tuple[str, int]:
    precision, batch = label.split("-b")
    return precision, int(batch)


def _setting_order(label: str) -> tuple[bool, int]:
    precision, batch = _parse_label(label)
    return precision != "fp32", batch


def comparisons(settings: dict[str, Path]) -> list[dict[str, Any]]:
    """Each batch size against batch 1 at the same precision, and bf16 against fp32 at the same batch size."""
    parsed = {label: _parse_label(label) for label in settings}
    pairs = []
    for label, (precision, batch) in parsed.items():
        for ref_label, (ref_precision, ref_batch) in parsed.items():
            same_precision = ref_precision == precision and ref_batch == 1 and batch != 1
            same_batch = ref_batch == batch and ref_precision == "fp32" and precision == "bf16"
            if same_precision or same_batch:
                pairs.append(
                    {
                        "reference": ref_label,
                        "setting": label,
                        **compare(settings[ref_label], settings[label]),
                    }
                )
    return pairs


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation stability: batch size and precision\n\nConfig `{report['config']}`, judge "
        f"`{report['judge']}`. Rates in % with 95% Wilson intervals. Comparisons: the share of answers that are the "
        "same text per prompt set; Δ = change of the rate in points, with the prompts that flipped yes → no / "
        "no → yes and McNemar's exact p; – = prompt set not evaluated in one of the two.\n"
    ]
    for name, model in report["models"].items():
        lines += [f"## {name}\n", "| setting | HS | HS+ | FA | OR |", "|---|---|---|---|---|"]
        for label, m in model["settings"].items():
            cells = [
                f"{m[k]:.1f} ({m['intervals'][k][0]:.1f}–{m['intervals'][k][1]:.1f})" if k in m else "–"
                for k in SHORT
            ]
            lines.append(f"| {label} | {' | '.join(cells)} |")
        lines += [
            "",
            "| setting vs reference | same answers (harmful / task / benign) | "
            + " | ".join(f"Δ{s} (−/+ flips, p)" for s in SHORT.values())
            + " |",
            "|---|---|" + "---|" * len(SHORT),
        ]
        for c in model["comparisons"]:
            same = " / ".join(
                f"{c['identical_answers'][k]:.0f}%" if k in c["identical_answers"] else "–"
                for k in ("harmful", "task", "benign")
            )
            cells = [
                f"{c[k]['difference']:+.1f} ({c[k]['flipped_to_no']}/{c[k]['flipped_to_yes']}, "
                f"p={c[k]['p_value']:.2f})"
                if k in c
                else "–"
                for k in SHORT
            ]
            lines.append(f"| {c['setting']} vs {c['reference']} | {same} | {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    # One colour and one offset per setting in every panel, whichever settings a model has.
    labels = sorted({label for m in report["models"].values() for label in m["settings"]}, key=_setting_order)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, name in zip(axes[0], names, strict=True):
        settings = report["models"][name]["settings"]
        for i, metric in enumerate(SHORT):
            for label, m in settings.items():
                j = labels.index(label)
                if metric not in m:
                    continue
                lo, hi = m["intervals"][metric]
                x = i + (j - (len(labels) - 1) / 2) * 0.18
                handles[label] = ax.errorbar(
                    x,
                    m[metric],
                    yerr=[[m[metric] - lo], [hi - m[metric]]],
                    fmt="o",
                    capsize=2,
                    color=f"C{j}",
                )
        ax.set_xticks(range(len(SHORT)), list(SHORT.values()))
        ax.set_ylim(-2, 102)
        ax.set_title(name)
        ax.set_ylabel("%")
    ordered = [label for label in labels if label in handles]
    axes[0][-1].legend(
        [handles[k] for k in ordered], ordered, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default="demo", help="run config whose evaluation is used (default: demo)"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="NAME=MODEL_DIR, or 'base' for the config's model; repeat for several",
    )
    parser.add_argument("--settings", default="fp32:1,fp32:32,bf16:1,bf16:32")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for these evaluations, e.g. evaluate.over_refusal_prompts=null",
    )
    parser.add_argument("--report-only", action="store_true", help="report the units already in --out")
    args = parser.parse_args()
    args.out = args.out.absolute()
    if not args.model:
        args.model = ["base"]
    units = existing_units(args.out) if args.report_only else evaluate_all(args)
    if not units:
        raise SystemExit(
            f"no complete evaluation under {args.out / 'units'}: run without --report-only first"
        )
    run = load_config(args.config)
    report: dict[str, Any] = {"config": args.config, "judge": run.evaluate.judge, "models": {}}
    for name, settings in units.items():
        settings = dict(sorted(settings.items(), key=lambda item: _setting_order(item[0])))
        report["models"][name] = {
            "settings": {label: read_json(path / MARKER)["metrics"] for label, path in settings.items()},
            "comparisons": comparisons(settings),
        }
    write_json_atomic(args.out / "report.json", report)
    write_text_atomic(args.out / "report.md", markdown(report))
    plot(report, args.out / "rates.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
