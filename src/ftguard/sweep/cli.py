"""`ftguard sweep CONFIG`: run a grid, resume it, or only print its plan (--dry-run) or report (--report)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of runs (defenses × ratios × tasks × seeds × attack settings) and aggregate it",
    )
    p.add_argument("config", help="sweep YAML, or a packaged one such as paper/booster-table1")
    p.add_argument("--output-dir", help="default: the sweep's output_dir, else runs/sweeps/<name>")
    p.add_argument(
        "--units-dir",
        help="where trained models and evaluations live (default <output dir>/units); give another sweep's "
        "to reuse every unit the two share",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the runs, shared units and GPU hours; run nothing"
    )
    p.add_argument("--report", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("--shard", metavar="I/N", help="run only runs I, I+N, ... (for N parallel processes)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    p.add_argument(
        "--stop-after",
        type=_hours,
        metavar="HOURS",
        help="start no run that would end past HOURS from now (judged by the longest run so far); the same "
        "command resumes: for sweeps longer than a working session",
    )
    p.add_argument(
        "--defenses",
        type=_names,
        metavar="A,B",
        help="run only these defenses (comma-separated; the report covers every finished run): the rows wanted "
        "first of a sweep longer than the time at hand",
    )
    p.add_argument(
        "--seeds",
        type=_seeds,
        metavar="S,T",
        help="run only these seeds (comma-separated; with --defenses, both apply): one whole seed of a long sweep "
        "before the next",
    )
    p.add_argument(
        "--reuse",
        action="append",
        type=Path,
        metavar="DIR",
        help="another sweep's output folder or archive (repeatable): a run of the same config finished there is "
        "copied, not made again (its results say where from)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace units of a different config")
    p.add_argument("--json", action="store_true", help="print the plan or report as JSON")
    p.set_defaults(func=cmd_sweep)


def _hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not hours > 0:
        raise argparse.ArgumentTypeError(f"--stop-after takes a positive number of hours, got {text!r}")
    return hours


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"--defenses takes comma-separated defense names, got {text!r}")
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integer seeds, got {text!r}")
    return seeds


def cmd_sweep(args: argparse.Namespace) -> int:
    from ftguard.sweep.config import expand, load_sweep
    from ftguard.sweep.runner import parse_shard, run_sweep, sweep_dir

    sweep, folder = load_sweep(args.config)
    out = sweep_dir(sweep, args.output_dir)
    shard = parse_shard(args.shard)
    if args.dry_run:
        from ftguard.sweep.plan import describe, dry_run
        from ftguard.sweep.runner import select_runs

        runs = select_runs(sweep, expand(sweep, folder, out), args.defenses, args.seeds)
        reused: frozenset[str] = frozenset()
        if args.reuse:
            from ftguard.sweep.reuse import sources

            reused = frozenset(sources(runs, args.reuse))
        plan = dry_run(sweep, runs, reused)
        print(json.dumps(plan, indent=2, default=str) if args.json else describe(plan))
        return 0
    if args.report:
        from ftguard.sweep.report import write_report

        report = write_report(sweep, expand(sweep, folder, out), out)
    else:
        report = run_sweep(
            sweep,
            folder,
            output_dir=args.output_dir,
            units_dir=args.units_dir,
            overwrite=args.overwrite,
            shard=shard,
            fail_fast=args.fail_fast,
            stop_after_h=args.stop_after,
            defenses=args.defenses,
            seeds=args.seeds,
            reuse=args.reuse,
        )
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2, default=str))
    else:
        print(report["markdown"])
        beside = ", ".join(["runs.csv", "runs.json", *report.get("plots", [])])
        print(f"report: {out / 'report.md'} ({beside} beside it)")
    if report.get("not_started"):
        print(
            f"ftguard: stopped by --stop-after with {report['not_started']} run(s) left; run the same command again"
        )
    if report.get("failed"):
        print(f"ftguard: {len(report['failed'])} run(s) failed: {', '.join(report['failed'])}")
        return 1
    selection = args.defenses or args.seeds
    return 0 if report["complete"] or shard or (selection and report.get("selected_complete")) else 1
