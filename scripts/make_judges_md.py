"""Regenerate the validation section of docs/judges.md with `ftguard judge validate` on every labelled source.

    python scripts/train_judge.py --data-dir ../shared/data        # fold heads + the shipped heads
    python scripts/make_judges_md.py --data-dir ../shared/data     # this script

Every labelled source (docs/judges.md, "Labelled sources") is exported to its own JSONL file in the format of
``ftguard judge validate``, and the command's own code (``validate_file``) scores on it:

- ``ftguard-judge`` and the ``ftguard`` refusal detector with the heads of that source's fold, fitted without
  the source and without any row that shares a prompt with it (leave one source out);
- ``minilm`` and ``keyword`` (fixed judges) and the ``rules`` refusal detector, with nothing fitted on the
  labelled sources except ``minilm`` on beavertails-refusals (marked).

Writes ``docs/results/judge-validation/validate-<judge>.json`` and the packaged summary
``ftguard/assets/judge_validation.json`` (what run and sweep reports print beside the judge's name), and
replaces the text between the validation markers of docs/judges.md.

``--outside DIR`` also scores the shipped judge and detectors on every ``*.jsonl`` in DIR: labelled answers of
models and attacks that no fit has seen (made with scripts/convert_labelled.py; docs/judges.md, "Answers of
models we never fitted on"), into ``docs/results/judge-outside/`` and its own section of docs/judges.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ftguard.evaluation.labelled import write_labelled
from ftguard.evaluation.labelled_sources import SOURCES, load_sources
from ftguard.evaluation.validation import markdown_report
from ftguard.judge_cli import validate_file

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- validation:begin (scripts/make_judges_md.py) -->", "<!-- validation:end -->"
OUTSIDE_BEGIN, OUTSIDE_END = (
    "<!-- outside:begin (scripts/make_judges_md.py --outside) -->",
    "<!-- outside:end -->",
)
OUTSIDE = REPO / "docs" / "results" / "judge-outside"
TARGETS = {
    "harm": {"accuracy": 0.90, "recall": 0.90, "fpr": 0.10},
    "refusal": {"precision": 0.90, "recall": 0.90},
}


def merge(reports: list[dict], task: str) -> dict | None:
    """One {overall, by_source} from per-source reports; overall pools the held-out predictions of all folds."""
    parts = [r[task] for r in reports if r.get(task)]
    if not parts:
        return None
    from ftguard.evaluation.validation import binary_metrics

    by_source = {s: m for part in parts for s, m in part["by_source"].items()}
    tp, fp, fn, tn = (sum(m[k] for m in by_source.values()) for k in ("tp", "fp", "fn", "tn"))
    overall = binary_metrics(
        [True] * (tp + fp) + [False] * (fn + tn), [True] * tp + [False] * fp + [True] * fn + [False] * tn
    )
    return {"overall": overall, "by_source": dict(sorted(by_source.items()))}


MIN_DENOMINATOR = 20  # a rate over fewer answers (XSTest-GPT-4 has 1 harmful answer) is shown, not judged


def target_misses(report: dict) -> list[str]:
    misses = []
    for task, goals in TARGETS.items():
        for source, m in (report.get(task) or {}).get("by_source", {}).items():
            denominators = {
                "accuracy": m["n"],
                "recall": m["positives"],
                "precision": m["positives"],  # without positives every flag is false: precision says nothing
                "fpr": m["n"] - m["positives"],
            }
            for name, goal in goals.items():
                value = m[name]
                if value is None or denominators[name] < MIN_DENOMINATOR:
                    continue
                bad = value > goal if name == "fpr" else value < goal
                if bad:
                    misses.append(
                        f"{task} {name} on {source}: {100 * value:.1f}% (target {'≤' if name == 'fpr' else '≥'} {100 * goal:.0f}%)"
                    )
    return misses


JUDGES = ("ftguard-judge", "minilm", "keyword")


def cost_line() -> str:
    path = REPO / "docs" / "results" / "judge-validation" / "cost-ftguard-judge.json"
    if not path.is_file():
        return "Cost: run `python scripts/judge_cost.py` to measure it."
    cost = json.loads(path.read_text())
    return (
        f"Cost of `ftguard-judge` (`python scripts/judge_cost.py`): {cost['seconds_per_100_answers']:.1f} s per 100 "
        f"answers (median {cost['median_words']:.0f} words) on {cost['cpus']} CPU cores, model loading excluded; "
        "the harm and refusal verdicts come from the same pass."
    )


def openers() -> dict | None:
    path = REPO / "docs" / "results" / "judge-validation" / "loso.json"
    return json.loads(path.read_text()).get("openers") if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--folds", default=str(REPO / ".cache" / "judge-folds"), help="fold heads from train_judge.py"
    )
    parser.add_argument(
        "--export", default=str(REPO / ".cache" / "labelled"), help="where the JSONL files go"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the section from the saved validate-*.json files"
    )
    parser.add_argument(
        "--outside",
        help="a folder of labelled JSONL files of models no fit has seen: score the shipped judges",
    )
    args = parser.parse_args()

    out = REPO / "docs" / "results" / "judge-validation"
    if args.outside:
        write_outside(validate_outside(Path(args.outside)))
        return
    if args.report_only:
        results = {name: json.loads((out / f"validate-{name}.json").read_text()) for name in JUDGES}
        write_section(results)
        if OUTSIDE.is_dir():
            write_outside(
                {name: json.loads((OUTSIDE / f"validate-{name}.json").read_text()) for name in JUDGES}
            )
        return
    rows = load_sources(args.data_dir)
    export = Path(args.export)
    files = {}
    for source in SOURCES:
        files[source] = export / f"{source}.jsonl"
        write_labelled(files[source], [r for r in rows if r.source == source])

    results: dict[str, dict] = {}
    fixed = {"minilm": ("minilm", "rules"), "keyword": ("keyword", None)}
    per_judge: dict[str, list[dict]] = {"ftguard-judge": [], "minilm": [], "keyword": []}
    for source, path in files.items():
        fold = Path(args.folds) / f"{source}.safetensors"
        if not fold.is_file():
            sys.exit(f"no fold heads {fold}: run scripts/train_judge.py first")
        per_judge["ftguard-judge"].append(
            validate_file(
                path, "ftguard-judge", {"heads_path": str(fold)}, "ftguard", {"heads_path": str(fold)}
            )
        )
        for name, (judge, detector) in fixed.items():
            report = validate_file(path, judge, None, detector or "rules")
            per_judge[name].append(report)
        print(f"validated {source}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, reports in per_judge.items():
        results[name] = {"harm": merge(reports, "harm"), "refusal": merge(reports, "refusal")}
        (out / f"validate-{name}.json").write_text(json.dumps(results[name], indent=1) + "\n")
    write_section(results)


def write_section(results: dict[str, dict]) -> None:
    summary = {}
    for name, r in results.items():
        summary[name] = {}
        for task in ("harm", "refusal"):
            if not r[task]:
                summary[name][task] = None
                continue
            keep = {
                k: r[task]["overall"][k] for k in ("n", "positives", "accuracy", "precision", "recall", "fpr")
            }
            accuracies = [m["accuracy"] for m in r[task]["by_source"].values()]
            summary[name][task] = {**keep, "accuracy_by_source": [min(accuracies), max(accuracies)]}
    (REPO / "src" / "ftguard" / "assets" / "judge_validation.json").write_text(
        json.dumps(summary, indent=1) + "\n"
    )

    misses = target_misses(results["ftguard-judge"])
    section = [
        BEGIN,
        "",
        "Generated by `python scripts/make_judges_md.py` (after `python scripts/train_judge.py`); each row is "
        "`ftguard judge validate <source>.jsonl` on one labelled source. Rates in %, 95% Wilson interval in brackets.",
        "",
        "### `ftguard-judge` and the `ftguard` refusal detector, each source held out",
        "",
        markdown_report(results["ftguard-judge"]),
        "Targets (issue 18) on every held-out source: harm accuracy ≥ 90%, recall ≥ 90%, FPR ≤ 10%; refusal "
        "precision and recall ≥ 90%. "
        + ("All met." if not misses else "**Not met:** " + "; ".join(misses) + "."),
        "",
        'Bare compliance openers ("Sure, here is how to …:", fit-only answers built by '
        "`ftguard.evaluation.judges.augment`) for the prompts of each held-out source, from "
        "`scripts/train_judge.py` (docs/results/judge-validation/loso.json): caught after harmful prompts, let "
        "pass after benign ones?",
        "",
        markdown_report({"harm": openers()}),
        "### `minilm` judge (its head was fitted on beavertails-refusals: that row is in-sample)",
        "",
        markdown_report({"harm": results["minilm"]["harm"]}),
        "### `keyword` judge and the `rules` refusal detector (nothing fitted)",
        "",
        markdown_report(results["keyword"]),
        cost_line(),
        "",
        END,
    ]
    doc = REPO / "docs" / "judges.md"
    text = doc.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + "\n".join(section) + text[text.index(END) + len(END) :]
    else:
        text += "\n## Validation on labelled answers\n\n" + "\n".join(section) + "\n"
    doc.write_text(text)
    print("\n".join(section))


def validate_outside(folder: Path) -> dict[str, dict]:
    """The shipped judges on every labelled file in ``folder`` (no fold: nothing there was ever fitted on)."""
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        sys.exit(f"no *.jsonl in {folder}: make them with scripts/convert_labelled.py")
    setups = {
        "ftguard-judge": ("ftguard-judge", "ftguard"),
        "minilm": ("minilm", "rules"),
        "keyword": ("keyword", "rules"),
    }
    results = {}
    OUTSIDE.mkdir(parents=True, exist_ok=True)
    for name, (judge, detector) in setups.items():
        reports = [validate_file(path, judge, None, detector) for path in files]
        results[name] = {"harm": merge(reports, "harm"), "refusal": merge(reports, "refusal")}
        (OUTSIDE / f"validate-{name}.json").write_text(json.dumps(results[name], indent=1) + "\n")
        print(f"validated {name} on {len(files)} files", flush=True)
    return results


def write_outside(results: dict[str, dict]) -> None:
    misses = target_misses(results["ftguard-judge"])
    section = [
        OUTSIDE_BEGIN,
        "",
        "Generated by `python scripts/make_judges_md.py --outside DIR`; the shipped heads, nothing held out because "
        "nothing here was ever fitted on. Rates in %, 95% Wilson interval in brackets.",
        "",
        "**`ftguard-judge` and the `ftguard` refusal detector**",
        "",
        markdown_report(results["ftguard-judge"]),
        "Targets (issue 18): " + ("all met." if not misses else "**not met:** " + "; ".join(misses) + "."),
        "",
        "**`minilm` judge and the `rules` refusal detector**",
        "",
        markdown_report(results["minilm"]),
        "**`keyword` judge**",
        "",
        markdown_report({"harm": results["keyword"]["harm"]}),
        OUTSIDE_END,
    ]
    doc = REPO / "docs" / "judges.md"
    text = doc.read_text()
    if OUTSIDE_BEGIN not in text or OUTSIDE_END not in text:
        sys.exit(f"docs/judges.md lacks the markers {OUTSIDE_BEGIN} … {OUTSIDE_END}")
    text = (
        text[: text.index(OUTSIDE_BEGIN)]
        + "\n".join(section)
        + text[text.index(OUTSIDE_END) + len(OUTSIDE_END) :]
    )
    doc.write_text(text)


if __name__ == "__main__":
    main()
