"""Turn published human-labelled answer sets into the JSONL that `ftguard judge validate` reads.

    python scripts/convert_labelled.py xstest xstest_v2_completions_mistralinstruct.csv \
        --source xstest-mistralinstruct --out mistral.jsonl
    python scripts/convert_labelled.py harmbench text_behaviors_val_set.json --out harmbench.jsonl

`xstest` reads any model's completions CSV of the XSTest repository (paul-rottger/exaggerated-safety,
`model_completions/`); `harmbench` reads HarmBench's classifier validation set
(`data/classifier_val_sets/text_behaviors_val_set.json`), one source per attack method. `--partial` reads a
fragment of the HarmBench file (e.g. character ranges of it pasted together): every whole record found in it
is kept, the rest is skipped and counted. `--behaviours` (HarmBench's `harmbench_behaviors_text_all.csv`, or
any subset with its `Behavior` and `BehaviorID` columns) makes the prompt the behaviour itself, which is what
HarmBench's own classifier reads, instead of the attack's test case; records of other behaviours are dropped
and counted. What the labels mean: docs/judges.md, "Answers of models we never fitted on".
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import sys
from collections import Counter
from pathlib import Path

from ftguard.errors import FtguardError
from ftguard.evaluation.labelled import write_labelled
from ftguard.evaluation.labelled_sources import harmbench_row, read_xstest_completions

_RECORD_START = re.compile(r'\{\s*"test_case"\s*:')


def harmbench_fragment_records(text: str) -> tuple[list[dict], int]:
    """Whole HarmBench records in a fragment of the file, and how many starts were cut off."""
    decoder = json.JSONDecoder()
    records, broken = [], 0
    for match in _RECORD_START.finditer(text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            broken += 1
            continue
        records.append(obj)
    return records, broken


def harmbench_rows(args: argparse.Namespace) -> list:
    source = args.source or "harmbench"
    if args.partial:
        records, broken = harmbench_fragment_records(args.input.read_text(encoding="utf-8"))
        if not records:
            raise FtguardError(f"{args.input}: no whole HarmBench record found")
        print(f"{len(records)} whole records, {broken} cut off at a fragment's edge", file=sys.stderr)
    else:
        data = json.loads(args.input.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise FtguardError(f"{args.input}: expected HarmBench's mapping of behaviour id to records")
        records = [obj for group in data.values() for obj in group]
    if args.behaviours is None:
        return [harmbench_row(obj, source) for obj in records]
    behaviours = read_behaviours(args.behaviours)
    kept = [obj for obj in records if obj.get("behavior_id") in behaviours]
    print(
        f"{len(kept)} records of behaviours in {args.behaviours.name}, {len(records) - len(kept)} dropped",
        file=sys.stderr,
    )
    return [
        dataclasses.replace(harmbench_row(obj, source), prompt=behaviours[obj["behavior_id"]]) for obj in kept
    ]


def read_behaviours(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"Behavior", "BehaviorID"} <= set(rows[0]):
        raise FtguardError(f"{path}: expected HarmBench's behaviour CSV with columns Behavior and BehaviorID")
    return {row["BehaviorID"]: row["Behavior"] for row in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("format", choices=["xstest", "harmbench"])
    parser.add_argument("input", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--source",
        help="the source name (xstest: required, e.g. xstest-mistralinstruct; harmbench: default harmbench)",
    )
    parser.add_argument("--partial", action="store_true", help="harmbench: the input is a fragment")
    parser.add_argument("--behaviours", type=Path, help="harmbench: prompt = the behaviour, from this CSV")
    args = parser.parse_args(argv)
    try:
        if not args.input.is_file():
            raise FtguardError(f"{args.input} does not exist")
        if args.format == "xstest":
            if not args.source:
                raise FtguardError("xstest needs --source NAME (the model whose answers these are)")
            rows = read_xstest_completions(args.input, args.source)
        else:
            rows = harmbench_rows(args)
    except FtguardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = write_labelled(args.out, rows)
    counts = Counter((r.source, r.harmful, r.refusal) for r in rows)
    print(f"wrote {n} rows to {args.out}")
    for (source, harmful, refusal), k in sorted(counts.items(), key=str):
        print(f"  {source}: harmful={harmful} refusal={refusal}: {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
