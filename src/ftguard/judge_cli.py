"""`ftguard judge validate FILE`: how well a judge and the refusal detector agree with people's labels."""

from __future__ import annotations

import argparse
import json
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
    p.add_argument(
        "--judge-option",
        dest="judge_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the judge, e.g. --judge-option model=/path/to/beaver-dam-7b (repeatable)",
    )
    p.add_argument("--refusal-detector", default=None, help="ftguard (default) or rules")
    p.add_argument(
        "--detector-option",
        dest="detector_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the refusal detector, e.g. --detector-option heads_path=heads.safetensors (repeatable)",
    )
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the report as JSON to OUT")
    p.set_defaults(func=cmd_validate)


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
