"""Seconds per 100 answers of an offline judge on this machine, model loading excluded.

    python scripts/judge_cost.py [--judge ftguard-judge] [--data-dir ../shared/data] [--n 100]

Answers: the last n BeaverTails test prompts (beavertails-refusals), each with its harmful answer and its
written refusal; three timed repeats after one warm-up, the median reported. Writes
docs/results/judge-validation/cost-<judge>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ftguard.evaluation.judges import get_judge
from ftguard.evaluation.labelled_sources import load_sources

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--judge", default="ftguard-judge")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    rows = load_sources(args.data_dir, ["beavertails-refusals"])[-2 * args.n :]  # the test split's last rows
    judge = get_judge(args.judge)
    prompts, answers = [r.prompt for r in rows], [r.response for r in rows]
    judge.verdicts(prompts[:8], answers[:8])  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        judge.verdicts(prompts, answers)
        times.append(time.perf_counter() - start)
    per_100 = statistics.median(times) * 100 / len(rows)
    report = {
        "judge": args.judge,
        "answers": len(rows),
        "median_words": statistics.median(len(a.split()) for a in answers),
        "seconds_per_100_answers": round(per_100, 2),
        "repeats_s": [round(t, 2) for t in times],
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    out = REPO / "docs" / "results" / "judge-validation" / f"cost-{args.judge}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
