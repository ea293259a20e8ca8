"""Write a customer-style chat upload from the bundled data: the provider example of the README (docs/provider.md).

A review-moderation customer: SST-2 sentences as chat rows (system prompt, user asks for the sentiment, assistant
answers one word), with some harmful BeaverTails rows slipped in as chat rows too, the way a careless or hostile
customer's file would hold them; and held-out SST-2 rows in the same shape for FA. Nothing is committed: the rows
are rebuilt from the bundled data (src/ftguard/data/bundled, with its provenance and licences) on every call.

    python scripts/make_example_upload.py runs/customer-upload   # writes train.jsonl and eval.jsonl there
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ftguard.data.sources import load_examples
from ftguard.data.tasks import get_task

SYSTEM = "You are the review-moderation assistant of an online shop."
QUESTION = "Is the sentiment of this review positive or negative? Answer with one word.\n\nReview: {sentence}"
# Harmful rows from the training split past the rows any packaged config aligns on (demo: the first 256); the
# evaluation's harmful prompts are the test split, so the two never meet.
HARMFUL_FIRST = 300


def _chat(user: str, answer: str, system: str | None = SYSTEM) -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def build(n_task: int, n_harmful: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    sst2 = get_task("sst2")
    task_rows = [_chat(QUESTION.format(sentence=ex.input), ex.output) for ex in sst2.train_examples(n=n_task)]
    harmful = load_examples("beavertails_refusals", split="train", response="unsafe")
    harmful_rows = [
        _chat(ex.instruction, ex.output, system=None) for ex in harmful[HARMFUL_FIRST:][:n_harmful]
    ]
    train = task_rows + harmful_rows
    random.Random(seed).shuffle(train)
    held_out = [_chat(QUESTION.format(sentence=ex.input), ex.output) for ex in sst2.eval_examples(n=n_eval)]
    return train, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--task-rows", type=int, default=240)
    parser.add_argument("--harmful-rows", type=int, default=24)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, held_out = build(args.task_rows, args.harmful_rows, args.eval_rows, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (args.out / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(
        f"{args.out}: train.jsonl {len(train)} rows ({args.harmful_rows} harmful), eval.jsonl {len(held_out)} rows"
    )


if __name__ == "__main__":
    main()
