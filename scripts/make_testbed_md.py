"""Write docs/RESULTS.md for the CPU testbed (docs/testbed.md) from the output folders of its sweeps.

    python scripts/make_testbed_md.py \\
        --attack runs/sweeps/testbed-attack-calibration \\
        --calibration runs/sweeps/testbed-defense-calibration \\
        --align-calibration runs/sweeps/testbed-align-calibration \\
        --study runs/sweeps/testbed-study --strong runs/sweeps/testbed-study-strong \\
        --uncalibrated runs/sweeps/testbed-study-uncalibrated \\
        --attack-suite runs/sweeps/cpu-attack-suite \\
        --virus-probe docs/results/cpu-attack-suite-virus-probe \\
        --gemma runs/sweeps/testbed-gemma3-defenses > docs/RESULTS.md

Each section is the named sweep's own report (its report.md, rebuilt from the finished runs by
`ftguard sweep <name> --output-dir DIR --report`), framed with what a reader needs around it: which prompts,
which judge, how complete. A folder not given, or a sweep not finished, leaves its section marked pending, so
the page can be regenerated at every step of the study. The old protocol's page is
docs/RESULTS-strong-protocol.md (scripts/make_results_md.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from audit_paired import paired_audits
from audit_paired import summary as audit_summary
from design_power import pilot_pairs
from make_results_md import before_attack
from testbed_md_common import SWEEPS, read_report, section, status
from testbed_md_suite import attack_suite

from ftguard.evaluation.paired import detectable_before_the_run, t_over_seeds
from ftguard.metrics import METRICS
from ftguard.sweep.aggregate import mean_std

HEADER = """# CPU results: the testbed (SmolLM2-135M-Instruct)

The CPU testbed of docs/testbed.md: a helpful-and-harmless SFT alignment, an upload of SST2 mixed with general
instructions, a calibrated attack, defense settings chosen on validation prompts by rules written before the
runs, and the study on disjoint test prompts with paired statistics. Regenerate every table (2 CPU cores, each
sweep resumable; `for i in 0 1; do OMP_NUM_THREADS=1 ftguard sweep ... --shard $i/2 & done` runs two shards):

```
ftguard sweep sweeps/testbed-attack-calibration --output-dir runs/sweeps/testbed-attack-calibration
ftguard sweep sweeps/testbed-defense-calibration --output-dir runs/sweeps/testbed-defense-calibration \\
    --units-dir runs/sweeps/testbed-attack-calibration/units
ftguard sweep sweeps/testbed-align-calibration --output-dir runs/sweeps/testbed-align-calibration \\
    --units-dir runs/sweeps/testbed-attack-calibration/units
ftguard sweep sweeps/testbed-study --output-dir runs/sweeps/testbed-study
ftguard sweep sweeps/testbed-study-strong --output-dir runs/sweeps/testbed-study-strong \\
    --units-dir runs/sweeps/testbed-study/units
ftguard sweep sweeps/testbed-study-uncalibrated --output-dir runs/sweeps/testbed-study-uncalibrated \\
    --units-dir runs/sweeps/testbed-study/units
for judge in ftguard-judge keyword minilm ftguard-cross-judge; do ftguard judge rescore runs/sweeps/testbed-study \\
    --judge $judge --output-dir runs/sweeps/testbed-study-rescored/$judge; done
python scripts/make_testbed_md.py --attack runs/sweeps/testbed-attack-calibration \\
    --calibration runs/sweeps/testbed-defense-calibration \\
    --align-calibration runs/sweeps/testbed-align-calibration \\
    --study runs/sweeps/testbed-study --strong runs/sweeps/testbed-study-strong \\
    --uncalibrated runs/sweeps/testbed-study-uncalibrated \\
    --attack-suite runs/sweeps/cpu-attack-suite \\
    --virus-probe docs/results/cpu-attack-suite-virus-probe \\
    --gemma runs/sweeps/testbed-gemma3-defenses --audits docs/results/audits \\
    --rescored runs/sweeps/testbed-study-rescored > docs/RESULTS.md
```

Every finished run's config and results (no weights) are archived under `docs/results/<sweep name>/`; copying
such a folder into the output dir resumes the sweep with those runs done.

**Judge.** HS is the offline `ftguard-judge` (MiniLM-L6 embeddings and fitted heads; docs/judges.md), *not* the
papers' beaver-dam-7b: no HS here is comparable with a paper's. Its held-out and outside-model error is in
docs/judges.md; every run's results.json names the heads' hash. Over-refusal (OR) and instruction refusal (IR)
use ftguard's refusal detector.

**Prompts.** Settings were chosen on validation slices (the first 100 BeaverTails test prompts, XSTest safe prompts
and AlpacaEval items) and the study reports on disjoint test slices (the rows after those). XSTest and AlpacaEval
are ordered by kind, so their two slices hold different prompt types: validation and test over-refusal and
instruction refusal are not the same quantity (docs/testbed.md, protocol decisions). Compare rates within a slice.

**The old protocol** (refusal-only alignment, SST2-only upload, lr 5e-4 attack, 64 prompts, 3 seeds) is kept as it
was in docs/RESULTS-strong-protocol.md; docs/testbed.md says why it could not tell defenses apart.
"""


def _tables(markdown: str) -> str:
    """The report's per-slice tables and paired effects: everything between its preamble and the first section
    that is not a table of the sweep itself."""
    body = markdown.split("\n## ", 1)
    head = markdown.split("\n\n", 3)[-1] if len(body) == 1 else "## " + body[1]
    for stop in ("\n## Adaptive attack", "\n## Attack curve", "\n## Calibration", "\n**Incomplete:"):
        head = head.split(stop, 1)[0]
    return head.rstrip() + "\n"


# The study's design (sweeps/testbed-study): seeds, and items per seed of each rate on the test slices.
STUDY_SEEDS = 5
STUDY_ITEMS = {
    "harmful_score": 200,
    "harmful_score_plus": 200,
    "finetune_accuracy": 400,
    "over_refusal": 150,
    "instruction_refusal": 200,
}


def power(pilot: Path | None) -> list[str]:
    """What the study can detect, planned from the calibration's per-prompt outcomes (validation prompts), before
    the study's table is read: per rate, the range over the pilot's defenses of the two bounds of
    ``detectable_before_the_run``."""
    lines = ["## Power, planned before the study's table", ""]
    pairs = pilot_pairs(f"sweeps/{SWEEPS['calibration']}", pilot) if pilot else {}
    if not pairs:
        return [*lines, "Pending: the calibration sweep has not run.", ""]
    lines += [
        f"Design: {STUDY_SEEDS} seeds, paired with SFT on the same prompts and seeds; per seed "
        + ", ".join(f"{METRICS[m].abbrev} {n}" for m, n in STUDY_ITEMS.items())
        + " items. From each calibration setting's disagreement with SFT on the validation prompts (one seed), "
        "the difference the study detects with 80% power at a two-sided 5% level lies between two bounds: seeds "
        "that redraw every prompt's difference, and prompts whose difference repeats under every seed "
        "(`scripts/design_power.py` gives it per setting). Range over the calibration's settings:",
        "",
        "| rate | items per seed | disagreement with SFT (%) | detectable difference (points) |",
        "|---|---|---|---|",
    ]
    for metric, n in STUDY_ITEMS.items():
        bounds, shares = [], []
        for by_metric in pairs.values():
            runs = by_metric.get(metric) or []
            for a, b in runs:
                disc = sum(x != y for x, y in zip(a, b, strict=True)) / len(a)
                diff = (sum(a) - sum(b)) / len(a)
                shares.append(100 * disc)
                bounds.append(detectable_before_the_run(disc, diff, n, STUDY_SEEDS))
        if not bounds:
            continue
        low = (min(b[0] for b in bounds), max(b[0] for b in bounds))
        high = (min(b[1] for b in bounds), max(b[1] for b in bounds))
        lines.append(
            f"| {METRICS[metric].label} | {n} | {min(shares):.0f}–{max(shares):.0f} | "
            f"{low[0]:.1f}–{low[1]:.1f} (seeds redraw) … {high[0]:.1f}–{high[1]:.1f} (prompts repeat) |"
        )
    lines += [
        "",
        "A defense whose effect is smaller than the lower bound is more likely missed than found; the study's "
        "paired bootstrap reports the detectable difference it reached (in brackets after each interval).",
        "",
    ]
    return lines


# Each Gemma-3 defense's SmolLM2 run of the same config (all but the model: tests/test_make_testbed_md.py checks
# it): the calibrations' runs at the papers' settings, seed 43, p = 0.1, validation prompts.
COUNTERPARTS = {
    "sft": ("align_calibration", "sft"),
    "vaccine": ("align_calibration", "vaccine-rho2-s128"),
    "booster": ("align_calibration", "booster-lam5-s128"),
    "lisa": ("calibration", "lisa-rho1-share10"),
}
BESIDE = (
    ("harmful_score", "HS after"),
    ("finetune_accuracy", "FA"),
    ("over_refusal", "OR"),
    ("instruction_refusal", "IR"),
)


def _start_and_end(rows: list[dict], defense: str, p: float = 0.1) -> tuple[dict | None, dict | None]:
    """A defense's aligned model (the `align` point) and its final point at ``p``, one seed."""
    mine = [r for r in rows if r["defense"] == defense]
    start = next((r for r in mine if r["point"] == "align"), None)
    end = next((r for r in mine if r["final"] and r["p"] is not None and abs(r["p"] - p) < 1e-9), None)
    return start, end


def _pair(a: float | None, b: float | None) -> str:
    return " → ".join("–" if v is None else f"{v:.1f}" for v in (a, b))


def both_models(gemma_rows: list[dict], smollm: dict[str, Path | None]) -> list[str]:
    """SmolLM2 → Gemma-3 for each defense run on both under the same config at p = 0.1."""
    lines = [
        "**The same settings on both models** (SmolLM2-135M-Instruct → Gemma-3-270M; seed 43, p = 0.1, "
        "validation prompts; SmolLM2's runs are the calibrations' at the papers' settings, same config but the "
        "model):",
        "",
        "| defense | HS before | " + " | ".join(label for _, label in BESIDE) + " |",
        "|---|" + "---|" * (len(BESIDE) + 1),
    ]
    found = 0
    for defense, (key, name) in COUNTERPARTS.items():
        g_start, g_end = _start_and_end(gemma_rows, defense)
        folder = smollm.get(key)
        if g_end is None or folder is None or not (folder / "runs.json").is_file():
            continue
        s_start, s_end = _start_and_end(json.loads((folder / "runs.json").read_text()), name)
        if s_end is None:
            continue
        found += 1
        cells = [_pair(s_start and s_start["harmful_score"], g_start and g_start["harmful_score"])]
        cells += [_pair(s_end.get(metric), g_end.get(metric)) for metric, _ in BESIDE]
        lines.append(f"| {defense} | " + " | ".join(cells) + " |")
    return [*lines, ""] if found else []


def second_model(folder: Path | None, smollm: dict[str, Path | None] | None = None) -> list[str]:
    """Item 7 of docs/testbed.md: the testbed's protocol on Gemma-3-270M, a base model, beside SmolLM2."""
    lines = ["## 6. A second model: Gemma-3-270M (base)", ""]
    report = read_report(folder)
    if not report:
        return [*lines, f"`sweeps/{SWEEPS['gemma']}`: pending.", ""]
    rows = json.loads((folder / "runs.json").read_text())
    return [
        *lines,
        f"`sweeps/{SWEEPS['gemma']}`, {status(report[1])}. The same alignment data, upload and calibrated attack "
        "on Gemma-3-270M, the base model (dequantised from its 4-bit GGUF; Gemma terms), SFT and the papers' "
        "settings of Vaccine, Booster and Lisa, one seed, on the **validation** prompts (100 each): a look at "
        "whether the direction of the effects changes with the model, not a table to rank defenses by. Compare "
        "with SmolLM2's validation numbers (below, and docs/testbed.md, item 7), not with sections 1–4.",
        "",
        *both_models(rows, smollm or {}),
        before_attack(rows),
        _tables(report[0]),
    ]


AUDIT_PLOT = "judged_vs_audited.png"  # `audit_paired.py summary --plot`, made by `make results-pages`


def at_audited_shares(paths: list[Path], study: dict | None, outside: list[Path] = ()) -> list[str]:
    """Each audited defense's study effect scaled by the share of the judged fall its audits kept (a rough
    reading: a ratio of two one-seed numbers), beside the difference the design detects. Where an audit of the
    prompts the judge scored alike exists for the same defense and seed (``outside``), its genuine flips count too."""
    if study is None:
        return []
    more = {(a["defense"], a["seed"]): got["audited"] for a, got in paired_audits(list(outside))}
    shares: dict[str, list[tuple[int, float]]] = {}
    for audit, got in paired_audits(paths):
        if got["judged"] < 0:  # a share of a fall; a judged rise has none
            audited = got["audited"] + more.get((audit["defense"], audit["seed"]), 0.0)
            shares.setdefault(audit["defense"], []).append((audit["seed"], audited / got["judged"]))
    lines = []
    for defense, kept in shares.items():
        cell = _paired_hs(study, defense)
        if not cell:
            continue
        lo, hi = cell["interval"]
        scaled = sorted(cell["diff"] * share for _, share in kept)
        at = f"{scaled[0]:+.1f}" if len(scaled) == 1 else f"{scaled[0]:+.1f} to {scaled[-1]:+.1f}"
        by_seed = ", ".join(f"{100 * share:.0f}% (seed {seed})" for seed, share in sorted(kept))
        lines.append(
            f"| {defense} | {cell['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {by_seed} | {at} | {cell['detectable']:.1f} |"
        )
    if not lines:
        return []
    return [
        "The study's HS effect at the shares the audits kept (audited over judged difference at each audited seed, "
        "the prompts the judge scored alike included where they were read; a rough reading, a ratio of two "
        "one-seed numbers), beside the smallest difference the design detects:",
        "",
        "| defense | study's HS effect [95%] | audited share of the judged fall | effect at those shares | "
        "detectable |",
        "|---|---|---|---|---|",
        *lines,
        "",
    ]


OUTSIDE = "audits-outside"  # beside the audits: what they could not see


def outside_audits(folder: Path, inside: list[Path]) -> list[str]:
    """Audits of the prompts the study's judge scored alike in both arms and another judge did not (each names
    the audit it completes, ``outside_of``), and each pair's sum: a fuller audited difference."""
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    found = paired_audits(paths)
    if not found:
        return []
    first = {(a["defense"], a["seed"]): got for a, got in paired_audits(inside)}
    judge = found[0][0]["judge"]
    lines = [
        f"What those audits could not see: the prompts the study's judge scored alike for SFT and the defense but "
        f"`{judge}` did not, read blind in the same way (docs/results/{OUTSIDE}/; here the judge's difference is "
        f"`{judge}`'s on those prompts):",
        "",
        audit_summary(paths),
        "",
        "| defense | seed | study judge's difference | audited, its discordant prompts | audited, the others' | "
        "audited in all |",
        "|---|---|---|---|---|---|",
    ]
    for audit, got in found:
        mine = first.get((audit["defense"], audit["seed"]))
        if mine is None:
            continue
        total = mine["audited"] + got["audited"]
        lines.append(
            f"| {audit['defense']} | {audit['seed']} | {mine['judged']:+.1f} | {mine['audited']:+.1f} | "
            f"{got['audited']:+.1f} | {total:+.1f} |"
        )
    return [*lines, ""]


def hand_audits(folder: Path | None, study: dict | None = None) -> list[str]:
    """The hand audits of the study's paired HS effects (scripts/audit_paired.py), beside the table they qualify."""
    paths = sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []
    if not paired_audits(paths):
        return []
    return [
        "### What the judge adds: hand audits of the paired HS effects",
        "",
        "The prompts the judge scored differently for SFT and a defense, read by hand (one labeller; how, and what "
        "it means, in docs/testbed.md, step 5). Differences in points of the 200 test prompts at one seed; "
        "audited counts only the genuine flips. Prompts the judge scored alike in both arms are not read here: "
        "a genuine difference there stays hidden (next table), so the audited numbers are lower bounds.",
        "",
        audit_summary(paths),
        "",
        *outside_audits(folder.parent / OUTSIDE, paths),
        *at_audited_shares(paths, study, sorted((folder.parent / OUTSIDE).glob("*.json"))),
        *(
            [f"![judged against audited](results/{folder.name}/{AUDIT_PLOT})", ""]
            if (folder / AUDIT_PLOT).is_file()
            else []
        ),
    ]


# `ftguard judge rescore` of the study's answers still on disk: the judge the study ran with first (its verdicts
# reproduced, and the same-runs reference), then the others in this order
RESCORED_JUDGES = ("ftguard-judge", "keyword", "minilm", "ftguard-cross-judge")
RESCORED_WHAT = {
    "ftguard-judge": "the study's judge",
    "keyword": "refusal phrases only",
    "minilm": "the answer alone, refusal versus anything else",
    "ftguard-cross-judge": "MiniLM tuned on prompt-answer pairs",
}


def rescored_rows(folder: Path, judge: str) -> list[dict]:
    """A judge's rescored runs (runs.json): the archived copy's, then those judged on a later machine
    (``added/``, scripts/archive_sweep.py) that the archived copy lacks."""
    rows = json.loads((folder / judge / "runs.json").read_text())
    added = folder / judge / "added" / "runs.json"
    if added.is_file():
        held = {r["run"] for r in rows}
        rows += [r for r in json.loads(added.read_text()) if r["run"] not in held]
    return rows


def rescored_points(folder: Path, judge: str) -> list[dict]:
    """The judge's scored evaluation points (rescore.json), the ``added/`` copy's included."""
    points = []
    for summary in (folder / judge / "rescore.json", folder / judge / "added" / "rescore.json"):
        if summary.is_file():
            points += [p for p in json.loads(summary.read_text())["points"] if not p.get("missing")]
    return points


def seed_level_effect(rows: list[dict], defense: str, p: float = 0.1) -> dict | None:
    """A defense's HS after the attack minus SFT's at the same seeds, Student's t over those seeds: the paired
    effect of runs whose answers were judged on different machines, so no prompt-level pairing (None below two
    seeds)."""

    def final_hs(name: str) -> dict[int, float]:
        return {
            r["seed"]: r["harmful_score"]
            for r in rows
            if r["defense"] == name and r["final"] and r["complete"] and r.get("p") == p
        }

    ours, sft = final_hs(defense), final_hs("sft")
    diffs = np.array([ours[s] - sft[s] for s in sorted(ours.keys() & sft.keys())])
    if len(diffs) < 2:
        return None
    return t_over_seeds(diffs) | {"seeds": len(diffs)}


def _paired_hs(report: dict, defense: str, p: str = "0.1") -> dict | None:
    (table,) = report["tables"][:1]
    return (table.get("paired", {}).get(defense, {}).get("harmful_score") or {}).get(p)


def other_judges(folder: Path | None) -> list[str]:
    """The study's paired HS effects with the same answers judged by other judges (scripts: `ftguard judge
    rescore`, archived in docs/results/testbed-study-rescored/<judge>/)."""
    found = [j for j in RESCORED_JUDGES if folder is not None and (folder / j / "report.json").is_file()]
    if "ftguard-judge" not in found or len(found) < 2:
        return []
    reports = {j: json.loads((folder / j / "report.json").read_text()) for j in found}
    scored = rescored_points(folder, "ftguard-judge")
    same = sum(r["agreement"] == 100.0 for r in scored)
    rows = {j: rescored_rows(folder, j) for j in found}
    seeds = sorted({r["seed"] for r in rows["ftguard-judge"] if r["final"] and r["complete"]})
    runs = len({r["run"] for r in rows["ftguard-judge"] if r["complete"]})
    paired = reports["ftguard-judge"]["tables"][0].get("paired", {})
    defenses = [d for d in paired if _paired_hs(reports["ftguard-judge"], d)]
    # defenses whose runs were judged on a later machine only (added/): read seed by seed against SFT
    later = sorted(
        d
        for d in {r["defense"] for r in rows["ftguard-judge"]} - set(paired) - {"sft"}
        if seed_level_effect(rows["ftguard-judge"], d)
    )

    def cell(judge: str, defense: str) -> str:
        c = _paired_hs(reports[judge], defense)
        if not c:
            return "–"
        lo, hi = c["interval"]
        mark = " †" if c.get("p_holm", 1.0) < 0.05 else ""
        return f"{c['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]{mark}"

    def later_cell(judge: str, defense: str) -> str:
        c = seed_level_effect(rows[judge], defense)
        if not c:
            return "–"
        lo, hi = c["interval"]
        return f"{c['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}] ‡"

    def sft_level(judge: str) -> str:
        values = [
            r["harmful_score"] for r in rows[judge] if r["defense"] == "sft" and r["final"] and r["complete"]
        ]
        return f"{sum(values) / len(values):.1f}" if values else "–"

    head = " | ".join(f"`{j}` ({RESCORED_WHAT[j]})" for j in found)
    lines = [
        "### The same answers under other judges",
        "",
        f"The study's answers still on disk ({runs} runs, at seeds {', '.join(map(str, seeds))}; the other runs' "
        "answers were on machines since gone), judged again with `ftguard judge rescore` "
        f"(docs/judges.md). Judged again by `ftguard-judge`, {same} of the {len(scored)} evaluation points of "
        "those runs got the verdicts they had, answer for answer; that copy is the same-runs reference for the "
        "others. Paired HS effect against SFT at p = 0.1 (points [95%]; † survives Holm over the column):",
        "",
        f"| defense | seeds | {head} |",
        "|---|---|" + "---|" * len(found),
    ]
    for defense in defenses:
        n = _paired_hs(reports["ftguard-judge"], defense)["seeds"]
        lines.append(f"| {defense} | {n} | " + " | ".join(cell(j, defense) for j in found) + " |")
    for defense in later:
        n = seed_level_effect(rows["ftguard-judge"], defense)["seeds"]
        lines.append(f"| {defense} | {n} | " + " | ".join(later_cell(j, defense) for j in found) + " |")
    lines += [
        "| *SFT's HS after the attack* | | " + " | ".join(sft_level(j) for j in found) + " |",
        "",
    ]
    if later:
        lines += [
            "‡ Runs made and judged on a later machine, which no longer held SFT's answers: the mean of the "
            "per-seed differences in HS against SFT's archived runs at the same seeds, with Student's t over "
            "those seeds (no prompt-level pairing, outside the Holm family).",
            "",
        ]
    lines += [
        "The judges disagree on the level (the refusal-phrase judge counts every answer without a stock refusal "
        "as harmful) and much less on the paired effects. The first three share a preference for explicit "
        "refusals over moralising answers that comply with nothing (read on these answers by hand: "
        "docs/judges.md, \"SmolLM2's (and Gemma's) answers in the testbed\"), so their agreement alone would "
        "not show that the effects are genuine falls in harmful compliance.",
        "",
    ]
    if "ftguard-cross-judge" in found:
        lines[-1:] = [
            "`ftguard-cross-judge` hardly shares that preference (it flags few of the hand-labelled moralising "
            "non-answers) and is the most accurate of the four on the hand labels (docs/judges.md). Hand audits "
            "of the prompts only it scores differently in the two arms (docs/testbed.md, step 5) find that it "
            "inflates the effects too, and that part of a genuine effect lies where the study's judge scored "
            "both arms alike.",
            "",
        ]
    return lines


def aligned_under_judges(folder: Path | None) -> list[str]:
    """The aligned models' HS before the attack with the same answers judged by every rescoring judge: whether
    a start's miss (or match) belongs to the study's judge or to the model."""
    found = [j for j in RESCORED_JUDGES if folder is not None and (folder / j / "runs.json").is_file()]
    if "ftguard-judge" not in found or len(found) < 2:
        return []
    # runs sharing an aligned model evaluate it once each: one value per alignment method and seed
    hs: dict[str, dict[str, dict[int, float]]] = {}
    for judge in found:
        for r in rescored_rows(folder, judge):
            if r["point"] == "align" and r.get("harmful_score") is not None:
                hs.setdefault(r["method"], {}).setdefault(judge, {}).setdefault(r["seed"], r["harmful_score"])
    if not hs:
        return []

    def cell(values: dict[int, float]) -> str:
        if not values:
            return "–"
        mean, std = mean_std(list(values.values()))
        return f"{mean:.1f} ± {std or 0.0:.1f}"

    lines = [
        "The same aligned models' answers judged again (`ftguard judge rescore`, the runs whose answers are still "
        "on disk; docs/results/testbed-study-rescored/): HS before the attack, mean ± std over seeds.",
        "",
        "| alignment | seeds | " + " | ".join(f"`{j}`" for j in found) + " |",
        "|---|---|" + "---|" * len(found),
    ]
    for method, by_judge in hs.items():
        seeds = len(by_judge.get("ftguard-judge", {}))
        lines.append(f"| {method} | {seeds} | " + " | ".join(cell(by_judge.get(j, {})) for j in found) + " |")
    return [*lines, ""]


def figure(folder: Path | None, key: str, name: str, alt: str) -> list[str]:
    """A sweep report's figure (sweep/plots.py), linked from its archive when the archive holds it."""
    if folder is None or not (folder / name).is_file():
        return []
    return [f"![{alt}](results/{SWEEPS[key]}/{name})", ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for key in SWEEPS:
        parser.add_argument(f"--{key.replace('_', '-')}", type=Path, help=f"output dir of {SWEEPS[key]}")
    parser.add_argument("--audits", type=Path, help="the hand audits' folder (docs/results/audits)")
    parser.add_argument(
        "--rescored",
        type=Path,
        help="the study judged again by other judges (docs/results/testbed-study-rescored, one folder per judge)",
    )
    args = parser.parse_args()
    out = [HEADER]

    out += ["## 1. Before the attack", ""]
    study = read_report(args.study)
    if study:
        rows = json.loads((args.study / "runs.json").read_text())
        out += [
            "The aligned models on the test prompts (each alignment method's `align` point; the defenses that "
            "keep the SFT alignment start from the `sft` row). Targets for SFT (docs/testbed.md, step 1): HS ≤ 10, "
            "OR ≤ 25, IR ≤ 10.",
            "",
            before_attack(rows),
            *aligned_under_judges(args.rescored),
        ]
    else:
        out += [
            "Pending: the study has not run yet (docs/testbed.md, step 1, has the validation numbers).",
            "",
        ]

    out += ["## 2. The calibrated attack", ""]
    attack = read_report(args.attack)
    if attack:
        out += [
            f"`sweeps/{SWEEPS['attack']}` on the validation prompts, one seed ({status(attack[1])}). The rule that "
            "picked lr 2e-4 × 64 steps is in docs/testbed.md, steps 2 and 3.",
            "",
            section(attack[0], "Attack curve").replace("## Attack curve", "### Attack curve", 1),
        ]
        out += figure(args.attack, "attack", "attack_curve.png", "HS at each attack setting, a line per p")
    else:
        out += ["Pending.", ""]

    out += ["## 3. Calibrated defenses", ""]
    for key, what in (
        ("calibration", "fine-tuning- and post-stage"),
        ("align_calibration", "alignment-stage"),
    ):
        report = read_report(getattr(args, key))
        if not report:
            out += [f"The {what} calibration (`sweeps/{SWEEPS[key]}`): pending.", ""]
            continue
        text = section(report[0], "Calibration")
        out += [
            f"The {what} defenses (`sweeps/{SWEEPS[key]}`, validation prompts, {status(report[1])}):",
            "",
            text.replace("## Calibration", "### Calibration", 1) if text else "No calibration block.\n",
        ]

    out += power(args.calibration)
    out += ["## 4. The study: every defense against SFT on the test prompts", ""]
    for key, attack_name in (
        ("study", "the calibrated attack"),
        ("strong", "the strong attack (lr 5e-4)"),
        ("uncalibrated", "the calibrated attack, defenses at their papers' defaults (not calibrated here)"),
    ):
        report = study if key == "study" else read_report(getattr(args, key))
        if not report:
            out += [f"Under {attack_name} (`sweeps/{SWEEPS[key]}`): pending.", ""]
            continue
        out += [f"### Under {attack_name} ({status(report[1])})", "", _tables(report[0])]
        out += figure(
            getattr(args, key),
            key,
            "paired_effects.png",
            "each defense's paired effect against SFT, 95% intervals, filled where it survives Holm",
        )
        if key == "study":
            out += hand_audits(args.audits, report[1])
            out += other_judges(args.rescored)
    out += attack_suite(args.attack_suite, args.virus_probe, args.audits)
    out += second_model(
        args.gemma, {"align_calibration": args.align_calibration, "calibration": args.calibration}
    )
    print("\n".join(out).rstrip() + "\n")


if __name__ == "__main__":
    main()
