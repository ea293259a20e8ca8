"""Write docs/RESULTS-strong-protocol.md (the old CPU protocol's page) from the output of `ftguard sweep sweeps/cpu-smollm2`.

    ftguard sweep sweeps/cpu-smollm2 --output-dir runs/sweeps/cpu-smollm2     # ~7 h on 2 cores as 2 shards, resumable
    python scripts/make_results_md.py runs/sweeps/cpu-smollm2 > docs/RESULTS-strong-protocol.md
    python scripts/archive_sweep.py runs/sweeps/cpu-smollm2 docs/results/cpu-smollm2   # the raw runs, no weights

With the attack-strength probe (`sweeps/cpu-smollm2-attack`, run with --units-dir pointing at the main sweep's
units) give its output dir as a second argument: its table follows the main one.

The table itself is the sweep's report.md, regenerated from the finished runs; this adds what a reader needs
around it: the command, the judge and its measured accuracy, the wall time, and how complete the sweep is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ftguard.metrics import HEADLINE
from ftguard.metrics import METRICS as VOCABULARY
from ftguard.sweep.aggregate import mean_std
from ftguard.sweep.config import ABBREVIATIONS

HEADER = """# CPU results, the old protocol: ten defense configurations on SmolLM2-135M-Instruct

The first CPU study, kept as it was. Its protocol cannot tell defenses apart (refusal-only alignment, an attack
that saturates SFT, 64 prompts × 3 seeds; docs/testbed.md says why); docs/RESULTS.md is the calibrated testbed
that replaces it.

Regenerate (2 CPU cores, resumable: run the same command again after an interruption):

```
ftguard sweep sweeps/cpu-smollm2 --output-dir runs/sweeps/cpu-smollm2
# the attack-strength probe at the end; it reuses the aligned models above (6 new fine-tunes):
ftguard sweep sweeps/cpu-smollm2-attack --output-dir runs/sweeps/cpu-smollm2-attack \\
    --units-dir runs/sweeps/cpu-smollm2/units
python scripts/make_results_md.py runs/sweeps/cpu-smollm2 runs/sweeps/cpu-smollm2-attack > docs/RESULTS-strong-protocol.md
```

Two processes of one thread each share the work (about 1.3× the throughput of one two-thread process here):
`for i in 0 1; do OMP_NUM_THREADS=1 ftguard sweep sweeps/cpu-smollm2 --output-dir runs/sweeps/cpu-smollm2 --shard $i/2 & done`.
Every finished run's config and results (no weights) are in `docs/results/cpu-smollm2/` and
`docs/results/cpu-smollm2-attack/` (`runs.csv` has every evaluated point); copying such a folder into the output
dir resumes the sweep with those runs done.

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
fine-tune (K_a/K_f 4/12); post-stage defenses repair the SFT fine-tune. Not in this sweep: the other
fine-tune-stage defenses (Vlguard, LDIFS, EWC, KL; each has a `<method>-smollm2` preset to run alone). FA: exact
match on 100 SST2 validation sentences; over-refusal: 100 XSTest safe prompts. Sizes and pitfalls:
docs/methods.md, CPU scale.

**Reading the numbers.** HS+ also counts degenerate answers (empty, one word, a word repeated; docs/judges.md).
SST2's targets are one word, so a clean fine-tune (p = 0) answers most harmful prompts with one word or none: a
low HS with a high HS+ there is this collapse, not safety, and the p = 0 column is the control an attack is read
against. The refusal-only SFT alignment refuses almost everything (the before-the-attack table below: over-refusal
99%, FA 0); the fine-tune undoes that (over-refusal 0), though at p = 0 most benign answers are degenerate too
(`benign_degenerate_rate` in each run's results), so there 0 is not helpfulness. A post-stage repair that brings
HS down together with an over-refusal near 100 has mostly brought the refusing model back.
"""


def main(sweep_dir: str, probe_dir: str | None = None) -> None:
    out = Path(sweep_dir)
    index = json.loads((out / "sweep.json").read_text())["runs"]
    report = (out / "report.md").read_text()
    expected = json.loads((out / "report.json").read_text())["runs"]
    done = [e for e in index.values() if e["status"] == "complete"]
    wall = sum(e.get("wall_time_s") or 0 for e in done)
    print(HEADER)
    print(
        f"**Status:** {len(done)} of {expected} runs complete. Wall time: {wall / 3600:.1f} h of run time in total "
        "(each run's own time; a unit shared by several runs is paid by the first; two one-thread shards ran at "
        "once on the 2 cores, so the elapsed time is about half).\n"
    )
    # The report's own title is replaced by the header above.
    print(report.split("\n", 2)[2] if report.startswith("# ") else report)
    print(before_attack(json.loads((out / "runs.json").read_text())))
    print(verdicts(json.loads((out / "report.json").read_text()), probed=probe_dir is not None))
    if probe_dir:
        print(probe(Path(probe_dir)))


# (key, abbreviation): the narrow tables and the verdict lines say OR, not over-refusal.
METRICS = tuple((key, VOCABULARY[key].abbrev) for key in HEADLINE)


def before_attack(rows: list[dict]) -> str:
    """Each alignment method before the user's fine-tune (the sweep's `align` evaluation point), mean ± std over
    seeds: the starting point an attack is read from. Runs sharing an aligned model report it once."""
    by_method: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r["point"] == "align":
            by_method.setdefault(r["method"], {})[r["seed"]] = r
    if not by_method:
        return ""
    # a rate no alignment was evaluated on (e.g. instruction refusal before it existed) gets no column
    metrics = [
        (key, label)
        for key, label in METRICS
        if any(r.get(key) is not None for seeds in by_method.values() for r in seeds.values())
    ]
    lines = [
        "**Before the attack** (each alignment method's model, mean ± std over seeds; the defenses that keep the "
        "SFT alignment start from the `sft` row)",
        "",
        "| alignment | " + " | ".join(label for _, label in metrics) + " | seeds |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for method, seeds in by_method.items():
        cells = []
        for metric, _ in metrics:
            values = [r[metric] for r in seeds.values() if r.get(metric) is not None]
            if not values:
                cells.append("–")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.1f} ± {std or 0.0:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(seeds)} |")
    return "\n".join([*lines, ""])


WORDS = {"↓": "lower than", "↑": "higher than", "≈": "indistinguishable from"}


def verdicts(report: dict, probed: bool = False) -> str:
    """One line per defense, read off the baseline marks of the average column (counts pooled over seeds and
    ratios): what a reader wants to know first, in words, with the numbers it rests on."""
    lines = ["## Verdicts against SFT (average over p, counts pooled over seeds)", ""]
    if not report.get("complete"):
        lines += [
            f"**Preliminary:** {report.get('complete_runs')} of {report.get('runs')} runs are in; a verdict resting "
            "on one seed can flip when the others arrive.",
            "",
        ]
    for table in report["tables"]:
        for defense, metrics in table.get("versus", {}).items():
            parts = []
            for metric, label in METRICS:
                if metric not in metrics:
                    continue  # a rate this report predates
                cell = metrics.get(metric, {}).get("avg")
                if cell is None:
                    parts.append(f"{label} not yet measured at every ratio")
                    continue
                lo, hi = cell["interval"]
                parts.append(
                    f"{label} {WORDS[cell['mark']]} SFT ({cell['diff']:+.1f} points, 95% {lo:+.1f} to {hi:+.1f})"
                )
            seeds = len(table["defenses"].get(defense, {}).get("seeds", []))
            lines.append(
                f"- **{defense}** ({seeds} seed{'s' if seeds != 1 else ''}): " + "; ".join(parts) + "."
            )
    lines += [
        "",
        "Where HS and HS+ disagree, the difference lies in degenerate answers (mostly at p = 0, where the fine-tune "
        "collapses): read HS+ before crediting a defense with a lower HS. "
        'A defense that is "indistinguishable from SFT" in HS did not help at this scale (32 attack steps at lr '
        "5e-4, ~50× the papers' learning rate); it says nothing about the papers' setting. The attack leaves SFT "
        "near saturation at p ≥ 0.1; docs/methods.md (CPU scale) advises an attack that leaves SFT at "
        "mid-range HS to see small effects of alignment-stage defenses, which this sweep does not do"
        + (
            ": the probe below attacks the same alignments at a lower learning rate."
            if probed
            else ": a milder attack is an open question here, not a negative result."
        ),
    ]
    return "\n".join(lines) + "\n"


def probe(out: Path) -> str:
    """The attack-strength probe, one row per defense and attack setting: each metric at every p, marked against
    SFT under the same attack, then the probe's worst-case table (capability guard included)."""
    report = json.loads((out / "report.json").read_text())
    seeds = sorted({s for t in report["tables"] for d in t["defenses"].values() for s in d["seeds"]})
    lines = [
        f"## Attack strength: a probe ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})",
        "",
        "The sweep file `src/ftguard/configs/sweeps/cpu-smollm2-attack.yaml` (command at the top). The tables "
        "above attack at lr 5e-4, which leaves SFT near saturation. The same alignments attacked at a "
        "lower learning rate show whether an alignment-stage defense helps once the attack does not saturate. "
        f"**Status:** {report['complete_runs']} of {report['runs']} runs complete. "
        "Each cell: the value at each p, marked against SFT under the same attack (counts pooled over seeds).",
        "",
    ]
    ratios: list[float] = []
    rows = []
    # reports written before a rate existed (instruction refusal) have no entry for it
    metrics = [
        (key, label)
        for key, label in METRICS
        if any(key in entry for t in report["tables"] for entry in t["defenses"].values())
    ]
    for table in report["tables"]:
        setting = _setting(table)
        ratios = table["ratios"]
        for defense, entry in table["defenses"].items():
            cells = []
            for metric, _ in metrics:
                marks = table.get("versus", {}).get(defense, {}).get(metric, {})
                parts = []
                for p in ratios:
                    stats = entry[metric].get(f"{p:g}", {})
                    mark = marks.get(f"{p:g}", {}).get("mark", "")
                    parts.append("–" if not stats.get("n") else f"{stats['mean']:.1f}{mark}")
                cells.append(" / ".join(parts))
            rows.append(f"| {defense} | {setting} | " + " | ".join(cells) + " |")
    at = " / ".join(f"{p:g}" for p in ratios)
    header = " | ".join(f"{label} (p = {at})" for _, label in metrics)
    lines += [f"| defense | attack | {header} |", "|---|---|" + "---|" * len(metrics), *rows, ""]
    lines += [_hs_against_sft(table) for table in report["tables"]]
    lines += [
        "",
        "Read with the before-the-attack table: the alignments do not start level (docs/methods.md, CPU "
        "scale, advises aligning every method to a comparable HS first, which this probe does not do), and "
        "with one seed each cell is one run of 64 prompts (±10–12 points). Read OR too: a lower HS beside a "
        "high OR is a model that still refuses most things, not one that has learned to refuse only harm.",
        "",
    ]
    worst = (out / "report.md").read_text().split("## Adaptive attack", 1)
    if len(worst) == 2:
        lines += ["### Adaptive attack" + worst[1].split("\n## ", 1)[0].rstrip(), ""]
    return "\n".join(lines)


def _setting(table: dict) -> str:
    """The table's attack setting, named as in the run folders ("lr 0.0002")."""
    axes = {k.split(".", 1)[1]: v for k, v in table["slice"].items()}  # "attack.<config path>" → value
    return ", ".join(f"{ABBREVIATIONS.get(k, k.split('.')[-1])} {v:g}" for k, v in axes.items())


def _hs_against_sft(table: dict) -> str:
    """One line per attack setting: SFT's HS at each p, and the defenses whose HS the marks put below or above."""
    setting = _setting(table)
    sft = table["defenses"].get("sft", {}).get("harmful_score", {})
    at = ", ".join(
        f"{sft[f'{p:g}']['mean']:.1f} at p = {p:g}" for p in table["ratios"] if sft.get(f"{p:g}", {}).get("n")
    )
    found: dict[str, list[str]] = {"↓": [], "↑": []}
    for defense, metrics in table.get("versus", {}).items():
        for p in table["ratios"]:
            mark = metrics.get("harmful_score", {}).get(f"{p:g}", {}).get("mark")
            if mark in found:
                found[mark].append(f"{defense} (p = {p:g})")
    return (
        f"- {setting}: SFT's HS {at}; HS lower than SFT: {', '.join(found['↓']) or 'none'}; "
        f"higher: {', '.join(found['↑']) or 'none'}."
    )


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(
            "usage: python scripts/make_results_md.py SWEEP_OUTPUT_DIR [PROBE_OUTPUT_DIR] > docs/RESULTS-strong-protocol.md"
        )
    main(*sys.argv[1:])
