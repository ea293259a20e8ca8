"""Write docs/RESULTS.md from the output of `ftguard sweep sweeps/cpu-smollm2`.

    ftguard sweep sweeps/cpu-smollm2 --output-dir runs/sweeps/cpu-smollm2     # ~9 h on 2 idle cores, resumable
    python scripts/make_results_md.py runs/sweeps/cpu-smollm2 > docs/RESULTS.md

The table itself is the sweep's report.md, regenerated from the finished runs; this adds what a reader needs
around it: the command, the judge and its measured accuracy, the wall time, and how complete the sweep is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = """# CPU results: every defense on SmolLM2-135M-Instruct

Regenerate (2 CPU cores, resumable: run the same command again after an interruption):

```
ftguard sweep sweeps/cpu-smollm2 --output-dir runs/sweeps/cpu-smollm2
python scripts/make_results_md.py runs/sweeps/cpu-smollm2 > docs/RESULTS.md
```

**Judge.** HS is the offline `minilm` judge (MiniLM-L6 embeddings + a logistic head trained on BeaverTails
answers), *not* the papers' beaver-dam-7b: these HS are not comparable to any paper's. On held-out BeaverTails
answers it has accuracy 88.4%, precision 89.2%, recall 87.3%, and flags 10.6% of safe answers (docs/judges.md):
differences of a few points between defenses are within its error. Over-refusal uses ftguard's refusal detector
(accuracy against XSTest's human labels in docs/judges.md). Each HS is over 64 prompts, so a single run's 95%
interval is about ±10–12 points; the ± below is the spread over seeds only.

**Protocol** (the sweep file `src/ftguard/configs/sweeps/cpu-smollm2.yaml`, base `demo`): refusal SFT alignment
(256 BeaverTails refusals, 32 steps, LoRA r 8 on q/k/v/o, lr 5e-4), then the user's fine-tune on SST2 (256
samples, p harmful, 32 steps, lr 5e-4; the attack is far stronger than the papers' lr 1e-5), then the post-stage
repair where the defense is one. Alignment-stage defenses replace the SFT alignment; Lisa/BSO replace the SFT
fine-tune (K_a/K_f 4/12); post-stage defenses repair the SFT fine-tune. FA: exact match on 100 SST2 validation
sentences; over-refusal: 100 XSTest safe prompts. Sizes and pitfalls: ../shared/docs/cpu-scale-notes.md.
"""


def main(sweep_dir: str) -> None:
    out = Path(sweep_dir)
    index = json.loads((out / "sweep.json").read_text())["runs"]
    report = (out / "report.md").read_text()
    done = [e for e in index.values() if e["status"] == "complete"]
    wall = sum(e.get("wall_time_s") or 0 for e in done)
    print(HEADER)
    print(
        f"**Status:** {len(done)} of 90 runs complete; wall time of the finished runs {wall / 3600:.1f} h on 2 CPU "
        "cores (shared units are paid by the first run that needs them; part of it under contention with other "
        "jobs).\n"
    )
    # The report's own title is replaced by the header above.
    print(report.split("\n", 2)[2] if report.startswith("# ") else report)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_results_md.py SWEEP_OUTPUT_DIR > docs/RESULTS.md")
    main(sys.argv[1])
