"""`ftguard judge validate FILE`: how well a judge and the refusal detector agree with people's labels;
`ftguard judge rescore RUN_OR_SWEEP`: the same answers judged by another judge."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from ftguard.errors import FtguardError


def add_parser(sub: argparse._SubParsersAction) -> None:
    judge = sub.add_parser("judge", help="check judges and the refusal detector against labelled answers")
    judge_sub = judge.add_subparsers(dest="judge_command", required=True, metavar="COMMAND")
    p = judge_sub.add_parser(
        "validate",
        help="accuracy, precision, recall and FPR of a judge and a refusal detector on a labelled JSONL file",
        description='FILE has one JSON object per answer: {"prompt", "response", "refusal": true|false|null, '
        '"harmful": true|false|null, "source"} (null = not labelled for that question).',
    )
    p.add_argument("file", help="labelled JSONL")
    p.add_argument("--judge", default=None, help="judge to check (default: the default judge, ftguard-judge)")
    _add_option_flag(p, "--judge-option", "judge_options", "judge", "model=/path/to/beaver-dam-7b")
    p.add_argument("--refusal-detector", default=None, help="ftguard (default) or rules")
    _add_option_flag(
        p, "--detector-option", "detector_options", "refusal detector", "heads_path=heads.safetensors"
    )
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the report as JSON to OUT")
    p.set_defaults(func=cmd_validate)

    r = judge_sub.add_parser(
        "rescore",
        help="judge a run's or a sweep's stored answers again with another judge (no generation): HS, HS+ and "
        "the sweep's paired effects under it",
    )
    r.add_argument("source", help="a run's output folder, or a sweep's output folder or archive")
    r.add_argument("--judge", required=True, help="the judge to score with, e.g. beaver-dam or llama-guard")
    _add_option_flag(r, "--judge-option", "judge_options", "judge", "model=/path/to/beaver-dam-7b")
    r.add_argument(
        "--refusal-detector",
        default=None,
        help="also detect over-refusal and instruction refusal again with this detector (ftguard or rules); "
        "default: keep them as they were",
    )
    _add_option_flag(
        r, "--detector-option", "detector_options", "refusal detector", "heads_path=heads.safetensors"
    )
    r.add_argument(
        "--output-dir", required=True, help="where the rescored copy goes (same layout as the source)"
    )
    r.add_argument(
        "--units-dir",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a units store holding the answers of runs that did not record where theirs are (repeatable; a "
        "sweep folder's own units/ is always searched)",
    )
    r.add_argument(
        "--sweep",
        help="the sweep's YAML, for its report under the new judge (default: SOURCE/sweep.yaml when it exists)",
    )
    r.add_argument(
        "--unreadable-as-degenerate",
        action="store_true",
        help="read answers in which fewer than half of the words are English words as degenerate, as "
        "evaluate.unreadable_as_degenerate does: never harmful, counted in HS+",
    )
    r.set_defaults(func=cmd_rescore)


def _add_option_flag(parser: argparse.ArgumentParser, flag: str, dest: str, what: str, example: str) -> None:
    """A repeatable KEY=VALUE option of a judge or refusal detector (read by ``_options``)."""
    parser.add_argument(
        flag,
        dest=dest,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"an option of the {what}, e.g. {flag} {example} (repeatable)",
    )


def _options(items: list[str], flag: str = "--judge-option") -> dict[str, Any]:
    import yaml

    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise FtguardError(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} threshold=0.6")
        options[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return options


def validate_file(
    path: str | Path,
    judge_name: str | None = None,
    judge_options: dict[str, Any] | None = None,
    detector_name: str | None = None,
    detector_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of ``ftguard judge validate``; each model is built only when the file has labels for it."""
    from ftguard.config import EvalConfig
    from ftguard.evaluation.judges import get_judge
    from ftguard.evaluation.labelled import read_labelled
    from ftguard.evaluation.refusal_detector import DEFAULT_DETECTOR, get_refusal_detector
    from ftguard.evaluation.validation import task_report

    rows = read_labelled(path)
    judge_name = judge_name or EvalConfig().judge
    report: dict[str, Any] = {"file": str(path), "n": len(rows), "harm": None, "refusal": None}
    harm_rows = [r for r in rows if r.harmful is not None]
    if harm_rows:
        judge = get_judge(judge_name, **(judge_options or {}))
        flags = judge.judge([r.prompt for r in harm_rows], [r.response for r in harm_rows])
        report["judge"] = judge.describe()
        report["harm"] = task_report(harm_rows, flags, "harm")
    refusal_rows = [r for r in rows if r.refusal is not None]
    if refusal_rows:
        detector = get_refusal_detector(detector_name or DEFAULT_DETECTOR, **(detector_options or {}))
        found = detector.detect([r.prompt for r in refusal_rows], [r.response for r in refusal_rows])
        report["refusal_detector"] = detector.describe()
        report["refusal"] = task_report(refusal_rows, found, "refusal")
    return report


def cmd_validate(args: argparse.Namespace) -> int:
    from ftguard.evaluation.validation import markdown_report

    report = validate_file(
        args.file,
        args.judge,
        _options(args.judge_options),
        args.refusal_detector,
        _options(args.detector_options, "--detector-option"),
    )
    titles = {}
    if report.get("judge"):
        titles["harm"] = f"harm, judge {report['judge']['name']} (positive = harmful)"
    if report.get("refusal_detector"):
        titles["refusal"] = f"refusal, detector {report['refusal_detector']['name']} (positive = refusal)"
    print(markdown_report(report, titles) + "Rates in %, 95% Wilson interval in brackets.")
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"report: {out}")
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from ftguard.evaluation.judges import get_judge, judge_versions
    from ftguard.evaluation.rescore import plot_summary, rescore, summary_markdown, summary_rows

    source, out = Path(args.source), Path(args.output_dir)
    if source.exists() and out.resolve() in (source.resolve(), *source.resolve().parents):
        raise FtguardError(f"--output-dir {out}: write the rescored copy outside {source}, not over it")
    options = _options(args.judge_options)
    sweep_file = source / "sweep.yaml"
    sweep = None
    if args.sweep or sweep_file.is_file():
        from ftguard.sweep.config import load_sweep, resolve_sweep_path

        sweep_file = resolve_sweep_path(args.sweep) if args.sweep else sweep_file  # a file or a packaged name
        sweep, folder = load_sweep(str(sweep_file))  # a wrong sweep fails before any judging
    judge = get_judge(args.judge, **options)
    if args.unreadable_as_degenerate:
        from ftguard.evaluation.judges.base import UnreadableAsDegenerate

        judge = UnreadableAsDegenerate(judge)
    versions = judge_versions(args.judge, options)
    detector = None
    if args.refusal_detector:
        from ftguard.evaluation.refusal_detector import get_refusal_detector

        detector = get_refusal_detector(
            args.refusal_detector, **_options(args.detector_options, "--detector-option")
        )
    # only now, with the sweep, judge and detector known good: an earlier rescored copy is made again whole
    if out.is_dir() and any(out.iterdir()):
        if not (out / "rescore.json").is_file():
            raise FtguardError(
                f"--output-dir {out} holds other files: give a new folder for the rescored copy"
            )
        shutil.rmtree(out)
    reports = rescore(source, out, judge, args.units_dir, versions, detector)
    before = sorted({str(r.judge_before) for r in reports}) or ["?"]
    rows = summary_rows(reports, source)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rescore.json").write_text(
        json.dumps(
            {"source": str(source), "judge": judge.describe(), "from": before, "points": rows}
            | ({"refusal_detector": detector.describe()} if detector else {}),
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    table = summary_markdown(rows, judge.name, ", ".join(before), args.refusal_detector)
    (out / "rescore.md").write_text(table, encoding="utf-8")
    plot_summary(rows, judge.name, ", ".join(before), out / "rescore.png")
    print(table)
    if sweep is not None:
        from ftguard.sweep.config import expand
        from ftguard.sweep.report import write_report

        if sweep_file.resolve() != (out / "sweep.yaml").resolve():
            shutil.copyfile(sweep_file, out / "sweep.yaml")  # the copy's report can be rebuilt from the copy
        report = write_report(sweep, expand(sweep, folder, out), out)
        # the sweep's own description names the judge it was run with: say at the top which one this is
        kept = "" if detector else " and over-refusal"
        banner = (
            f"> **Rescored by `{judge.name}`** from the answers of `{source}` (first judged by "
            f"{', '.join(before)}; `ftguard judge rescore`). FA{kept} {'is' if detector else 'are'} the first evaluation's.\n\n"
        )
        (out / "report.md").write_text(
            banner + (out / "report.md").read_text(encoding="utf-8"), encoding="utf-8"
        )
        print(f"the sweep's report under {judge.name}: {out / 'report.md'}")
        if not report["complete"]:
            print(f"ftguard: {report['complete_runs']} of {report['runs']} runs rescored in full")
    missing = sum(len(r.missing) for r in reports)
    print(f"rescored: {out / 'rescore.md'} (rescore.json, rescore.png beside it)")
    if missing:
        print(
            f"ftguard: the answers of {missing} point(s) were not found (listed in rescore.md): give the units "
            "store that holds them with --units-dir"
        )
    return 1 if missing else 0
