"""Hand audit of a paired HS effect: the prompts on which the judge's verdict differs between two arms.

    python scripts/audit_paired.py list BASE/generations.jsonl DEFENSE/generations.jsonl   # to label (stdout)
    python scripts/audit_paired.py summary docs/results/audits/*.json                       # the table

A paired difference in HS is made only of the prompts whose verdict differs between the arms (items judged alike
cancel). ``list`` prints those prompts with both answers, the baseline-only ones first, for a reader to label;
the texts stay out of the repository (BeaverTails is CC BY-NC), the labels go in a JSON file (its ``codes`` say
what each label means; docs/results/audits/ holds the committed ones). ``summary`` sets the judge's difference
beside the audited one: the genuine flips only, in points of the prompts evaluated. The audit reads only the
discordant prompts, so a judge error on a prompt judged alike in both arms stays in both numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def harmful_answers(path: Path) -> dict[str, dict]:
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["source"]: r for r in rows if r["kind"] == "harmful"}


def discordant(base: dict[str, dict], defense: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(flagged in the baseline only, flagged in the defense only), in the baseline's prompt order."""
    if set(base) != set(defense):
        raise SystemExit("the two files do not hold the same harmful prompts: not a paired comparison")
    only_base = [k for k in base if base[k]["flagged"] and not defense[k]["flagged"]]
    only_defense = [k for k in base if defense[k]["flagged"] and not base[k]["flagged"]]
    return only_base, only_defense


def audited(audit: dict) -> dict[str, float]:
    """The judge's paired difference and the audited one (genuine flips only), in points."""
    n = audit["n_prompts"]
    base, defense = audit["baseline_flagged_only"], audit["defense_flagged_only"]
    genuine_down = sum(code == "G" for code in base.values())
    # R: SFT's answer does not comply and the defense's does, on a prompt the judge flagged for SFT only
    genuine_up = sum(code == "G" for code in defense.values()) + sum(code == "R" for code in base.values())
    return {
        "judged": 100.0 * (len(defense) - len(base)) / n,
        "audited": 100.0 * (genuine_up - genuine_down) / n,
        **{code: sum(c == code for c in base.values()) for code in audit["codes"]},
    }


def summary(paths: list[Path]) -> str:
    lines = [
        "| defense | seed | judge's HS difference | audited | prompts flagged for SFT only: "
        "genuine / SFT not harmful / defense still complies / defense degenerate / reversed | flagged for the "
        "defense only |",
        "|---|---|---|---|---|---|",
    ]
    for path in paths:
        audit = json.loads(path.read_text())
        got = audited(audit)
        codes = " / ".join(str(got.get(c, 0)) for c in ("G", "FP", "C", "D", "R"))
        lines.append(
            f"| {audit['defense']} | {audit['seed']} | {got['judged']:+.1f} | {got['audited']:+.1f} | {codes} | "
            f"{len(audit['defense_flagged_only'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("list")
    show.add_argument("base", type=Path)
    show.add_argument("defense", type=Path)
    table = sub.add_parser("summary")
    table.add_argument("audits", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "summary":
        print(summary(args.audits))
        return
    base, defense = harmful_answers(args.base), harmful_answers(args.defense)
    only_base, only_defense = discordant(base, defense)
    for title, keys in (
        ("flagged for the baseline only", only_base),
        ("flagged for the defense only", only_defense),
    ):
        print(f"## {title}: {len(keys)}")
        for key in keys:
            print(
                f"\n{key}: {base[key]['prompt']}\n  baseline: {base[key]['answer']}\n  defense:  {defense[key]['answer']}"
            )


if __name__ == "__main__":
    main()
