"""`ftguard-cross-judge` on sources its fit did not see, beside `ftguard-judge` held out the same way.

    python scripts/train_cross_judge.py --data-dir ../shared/data --output W.safetensors --hold SOURCE ... \
        --report docs/results/judge-validation/cross-judge-held-out-NAME.json
    python scripts/make_cross_judge_md.py --write docs/judges.md

Each fold is one fit of the cross judge with its held-out sources (and every row sharing a prompt with them) left
out and every other labelled source in; `ftguard-judge`'s numbers are its own leave-one-source-out heads
(docs/results/judge-validation/loso.json, scripts/train_judge.py). The table goes between the
``cross-judge-folds`` markers of docs/judges.md; the tests check the committed page against it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_verdicts import replace_between_markers as between_markers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "judge-validation"
START = "<!-- cross-judge-folds:begin (scripts/make_cross_judge_md.py) -->"
END = "<!-- cross-judge-folds:end -->"


def folds(folder: Path) -> list[dict]:
    """The one-fit folds (a ``fit`` record: every source not held out was fitted), ordered by what they hold out.
    The experimental three-at-once fit predates that record and is described in the text instead."""
    found = [json.loads(p.read_text()) for p in sorted(folder.glob("cross-judge-held-out-*.json"))]
    return sorted((f for f in found if "fit" in f), key=lambda f: f["fit"]["held_out"])


def _ours(entry: dict, name: str) -> str:
    if not entry.get(name):
        return "–"
    value, low, high = entry[name]
    return f"{value:.1f} [{low:.1f}, {high:.1f}]"


def _judge(entry: dict | None, name: str) -> str:
    """ftguard-judge's loso.json keeps fractions and their interval apart."""
    if entry is None or entry.get(name) is None or (name == "recall" and entry["positives"] == 0):
        return "–"
    low, high = entry["ci95"][name]
    return f"{100 * entry[name]:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def render(folder: Path = RESULTS) -> str:
    loso = json.loads((folder / "loso.json").read_text())["held_out"]["harm"]["by_source"]
    lines = [
        "| held out | fit rows | source scored | answers (harmful) | accuracy % | recall % | FPR % "
        "| `ftguard-judge`: accuracy % | recall % | FPR % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fold in folds(folder):
        held = ", ".join(fold["fit"]["held_out"])
        for source, entry in sorted(fold["by_source"].items()):
            judge = loso.get(source)
            lines.append(
                f"| {held} | {fold['fit']['rows']:,} | {source} | {entry['n']:,} ({entry['positives']:,}) "
                f"| {_ours(entry, 'accuracy')} | {_ours(entry, 'recall')} | {_ours(entry, 'fpr')} "
                f"| {_judge(judge, 'accuracy')} | {_judge(judge, 'recall')} | {_judge(judge, 'fpr')} |"
            )
    return "\n".join(lines) + "\n"


def replace_between_markers(page: str, body: str) -> str:
    return between_markers(page, body, START, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of the folds' JSON files")
    parser.add_argument("--write", type=Path, help="the page to write the table into (between its markers)")
    args = parser.parse_args(argv)
    body = render(args.results)
    if args.write is None:
        print(body, end="")
        return
    args.write.write_text(
        replace_between_markers(args.write.read_text(encoding="utf-8"), body), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
