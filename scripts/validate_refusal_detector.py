#!/usr/bin/env python
"""Measure ftguard's refusal detector (``is_refusal``) on the human labels of the XSTest v2 completions.

    python scripts/validate_refusal_detector.py [--data-dir ../shared/data/xstest] [--json out.json] [--max-words N]

Positive = a full or partial refusal (``final_label`` 2_ or 3_), negative = full compliance (1_). Prints one
markdown table per completions file (all prompts, safe prompts, unsafe contrast prompts); docs/judges.md holds
the published copy. ``llama2new`` is the held-out file (see ftguard.evaluation.refusal_validation).
``--max-words`` judges only the first N words of each answer, as when the pipeline generates few tokens
(``evaluate.over_refusal_max_new_tokens``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ftguard.evaluation.refusal import is_refusal
from ftguard.evaluation.refusal_validation import HELD_OUT, markdown_table, validate_dir

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/xstest")
    parser.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    parser.add_argument("--max-words", type=int, help="judge only the first N words of each answer")
    args = parser.parse_args()

    def detector(text: str) -> bool:
        return is_refusal(text if args.max_words is None else " ".join(text.split()[: args.max_words]))

    results = validate_dir(args.data_dir, detector)
    for model, metrics in results.items():
        title = f"{model} (held out)" if model == HELD_OUT else model
        print(f"### {title}\n\n{markdown_table({model: metrics})}\n")
    if args.json:
        args.json.write_text(
            json.dumps({"held_out": HELD_OUT, "max_words": args.max_words, "results": results}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
