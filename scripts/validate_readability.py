"""How often the unreadable-answer rule (ftguard.evaluation.readability) fires, per source of answers.

Readable sources give its false-positive rate: human-written and strong models' answers (the judges' labelled
sources, which the rule's form was chosen on, and four sources it was not: HH-RLHF assistant turns, GSM8K
solutions, AG News articles, SST-2 sentences), and every answer SmolLM2 gave in the study (--units-dir). Hand-read
gibberish gives its recall (--labelled: rows with text and a readable/unreadable label). Harmful-labelled answers
say how much HS the rule could take away from a real harmful answer.

    python scripts/validate_readability.py --data-dir ../shared/data --units-dir UNITS \
        --labelled labels.json --out docs/results/judge-validation/readability.json
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from collections import defaultdict
from pathlib import Path

from ftguard.evaluation.labelled_sources import load_sources
from ftguard.evaluation.readability import MIN_ENGLISH_SHARE, MIN_WORDS, english_share
from ftguard.evaluation.scorers import is_degenerate
from ftguard.evaluation.stats import rate


def held_out_references(data_dir: Path) -> dict[str, list[str]]:
    """Readable text the rule's form was not chosen on."""
    hh = []
    with gzip.open(data_dir / "hh_rlhf_harmless" / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            for turn in json.loads(line)["chosen"].split("\n\nAssistant: ")[1:]:
                hh.append(turn.split("\n\nHuman: ")[0])
    gsm8k = [
        json.loads(line)["answer"] for line in (data_dir / "gsm8k" / "test.jsonl").open(encoding="utf-8")
    ]
    with (data_dir / "ag_news" / "test.csv").open(encoding="utf-8") as f:
        ag_news = [f"{title}. {text}" for _, title, text in csv.reader(f)]
    with (data_dir / "sst2" / "dev.tsv").open(encoding="utf-8") as f:
        sst2 = [row["sentence"] for row in csv.DictReader(f, delimiter="\t")]
    return {"hh-rlhf-harmless": hh, "gsm8k": gsm8k, "ag-news": ag_news, "sst2": sst2}


def model_answers(units_dir: Path, exclude: set[str]) -> dict[str, list[str]]:
    """Every stored answer by kind (harmful, task, benign, instruction), except the units named in exclude."""
    answers: dict[str, list[str]] = defaultdict(list)
    for path in sorted((units_dir / "eval").glob("*/generations.jsonl")):
        if path.parent.name in exclude:
            continue
        for line in path.open(encoding="utf-8"):
            row = json.loads(line)
            answers[f"smollm2-{row['kind']}"].append(row["answer"])
    return dict(answers)


def fires(texts: list[str]) -> dict:
    shares = [english_share(t) for t in texts]
    flagged = [s is not None and s < MIN_ENGLISH_SHARE for s in shares]
    degenerate = [is_degenerate(t) for t in texts]
    return {
        "n": len(texts),
        "judgeable": sum(s is not None for s in shares),
        "unreadable": rate(sum(flagged), len(texts)),
        "unreadable_not_degenerate": sum(f and not d for f, d in zip(flagged, degenerate, strict=True)),
        "degenerate": rate(sum(degenerate), len(texts)),
        "degenerate_or_unreadable": rate(
            sum(f or d for f, d in zip(flagged, degenerate, strict=True)), len(texts)
        ),
        "examples": [t[:160] for t, f in zip(texts, flagged, strict=True) if f][:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument(
        "--units-dir", type=Path, help="a units store whose eval units keep generations.jsonl"
    )
    parser.add_argument("--broken-unit", action="append", default=[], help="an eval unit read as gibberish")
    parser.add_argument("--labelled", type=Path, action="append", default=[], help="hand-read answers (JSON)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    labelled = load_sources(args.data_dir)
    seen: dict[str, list[str]] = defaultdict(list)
    harmful: dict[str, list[str]] = defaultdict(list)
    for row in labelled:
        seen[row.source].append(row.response)
        if row.harmful:
            harmful[row.source].append(row.response)
    report = {
        "rule": {
            "min_english_share": MIN_ENGLISH_SHARE,
            "min_words": MIN_WORDS,
            "word_list": "whole words of the uncased BERT WordPiece vocabulary (assets/english_words.md)",
        },
        "readable_seen": {name: fires(texts) for name, texts in sorted(seen.items())},
        "readable_held_out": {
            name: fires(texts) for name, texts in held_out_references(args.data_dir).items()
        },
        "harmful_labelled": {name: fires(texts) for name, texts in sorted(harmful.items())},
    }
    if args.units_dir:
        report["smollm2_answers"] = {
            name: fires(texts) for name, texts in model_answers(args.units_dir, set(args.broken_unit)).items()
        }
        for unit in args.broken_unit:
            rows = [
                json.loads(line) for line in (args.units_dir / "eval" / unit / "generations.jsonl").open()
            ]
            report.setdefault("broken_units", {})[unit] = {
                kind: fires([r["answer"] for r in rows if r["kind"] == kind])
                for kind in sorted({r["kind"] for r in rows})
            }
    for path in args.labelled:
        rows = json.loads(path.read_text(encoding="utf-8"))
        groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for row in rows["answers"]:
            groups[row["group"]][row["label"]].append(row["text"])
        report.setdefault("hand_read", {})[path.stem] = {
            "what": rows["what"],
            "groups": {
                g: {label: fires(texts) for label, texts in by.items()} for g, by in sorted(groups.items())
            },
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


SECTIONS = {
    "readable_seen": "readable, the rule's form chosen on these",
    "readable_held_out": "readable, held out",
    "smollm2_answers": "SmolLM2's answers in the CPU study (the broken unit left out)",
    "harmful_labelled": "harmful-labelled answers (what HS could lose)",
    "broken_units": "gibberish: the broken unit (Antidote after the full-parameter attack), by kind",
}


def markdown(report: dict) -> str:
    lines = [
        "| answers | source | n | unreadable | 95% interval | of them not degenerate already | degenerate "
        "| degenerate or unreadable |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(section: str, name: str, v: dict) -> None:
        u, d = v["unreadable"], v["degenerate"]
        lines.append(
            f"| {section} | {name} | {v['n']} | {u['value']:.2f}% ({u['k']}) | {u['ci95'][0]:.2f}–{u['ci95'][1]:.2f} "
            f"| {v['unreadable_not_degenerate']} | {d['value']:.1f}% | {v['degenerate_or_unreadable']['value']:.1f}% |"
        )

    for key, title in SECTIONS.items():
        entries = report.get(key, {})
        if key == "broken_units":
            entries = {
                f"{unit[:8]} {kind}": v for unit, kinds in entries.items() for kind, v in kinds.items()
            }
        for name, v in entries.items():
            row(title, name, v)
    for name, read in report.get("hand_read", {}).items():
        for group, labels in read["groups"].items():
            for label, v in sorted(labels.items()):
                row(f"hand-read: {name}", f"{group}, {label}", v)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
