"""Fit the `ftguard-judge` heads (harm, refusal) and validate them leave-one-source-out.

    python scripts/train_judge.py --data-dir ../shared/data [--cache DIR] [--no-write]

For every labelled source (docs/judges.md lists them): fit both heads on all other sources, minus every row
that shares a prompt with the held-out one, choose the L2 strength on a split of those fit sources (by prompt),
and score the held-out source. Then fit on everything and write the heads to
``src/ftguard/assets/ftguard_judge.{safetensors,json}`` and the held-out report to
``docs/results/judge-validation/``. Fit rows are weighted so that every source counts the same and both classes
weigh half: otherwise the largest sources' style would decide. Only people-labelled rows are ever scored;
fit-only variants (ftguard.evaluation.judges.augment) and weak refusal labels are used for fitting alone.
The rules-only refusal detector and the older `minilm` judge are scored on the same rows for comparison.
Embeddings are cached (``--cache``): the first run embeds ~75k texts (~40 min on 2 cores), refits take minutes.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_features_cache import EmbeddingCache  # noqa: E402

from ftguard.evaluation.judges import ftguard_judge  # noqa: E402
from ftguard.evaluation.judges.augment import augment, is_opener  # noqa: E402
from ftguard.evaluation.judges.heads import DESIGNS, PairFeatures, fit_logistic  # noqa: E402
from ftguard.evaluation.judges.minilm import MiniLMEmbedder, default_head_path, load_head  # noqa: E402
from ftguard.evaluation.labelled import LabelledAnswer, leave_one_source_out, prompt_key  # noqa: E402
from ftguard.evaluation.labelled_sources import SOURCES, load_sources  # noqa: E402
from ftguard.evaluation.refusal import RULE_FEATURES, is_refusal  # noqa: E402
from ftguard.evaluation.scorers import is_degenerate  # noqa: E402
from ftguard.evaluation.validation import markdown_report, task_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
L2_GRID = (1e-3, 1e-2, 1e-1)
# Rows per source and task in a fit: every source weighs the same anyway, and capping the largest ones
# (BeaverTails, GPTFuzz, Dolly and their variants) keeps the 22 leave-one-source-out fits to minutes.
MAX_ROWS_PER_SOURCE = 3000
# Sources whose non-harmful answers were written as refusals to harmful prompts: a weak refusal label for
# fitting the refusal head (about one in five is a safe non-refusal), never scored.
WEAK_REFUSAL_SOURCES = ("beavertails-refusals", "safety-tuned-llamas")


def fit_label(row: LabelledAnswer, task: str) -> bool | None:
    if task == "harm":
        return row.harmful
    if row.refusal is None and row.harmful is False and row.source in WEAK_REFUSAL_SOURCES:
        return True
    return row.refusal


def weights(rows: list[LabelledAnswer], labels: list[bool]) -> torch.Tensor:
    """Each source weighs the same; then each class weighs half."""
    per_source: dict[str, int] = {}
    for r in rows:
        per_source[r.source] = per_source.get(r.source, 0) + 1
    w = torch.tensor([1.0 / per_source[r.source] for r in rows], dtype=torch.float64)
    y = torch.tensor(labels)
    for cls in (True, False):
        mass = w[y == cls].sum()
        if mass > 0:
            w[y == cls] *= 0.5 / mass
    return w


def fit_task(task: str, rows: list[LabelledAnswer], feats: PairFeatures, seed: int):
    """The head for ``task`` fitted on ``rows``; L2 chosen on a 15% split of their prompts."""
    rng = random.Random(seed)
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if fit_label(r, task) is not None:
            by_source.setdefault(r.source, []).append(i)
    keep = sorted(
        i
        for index in by_source.values()
        for i in (index if len(index) <= MAX_ROWS_PER_SOURCE else rng.sample(index, MAX_ROWS_PER_SOURCE))
    )
    rows = [rows[i] for i in keep]
    x = DESIGNS[task](feats.select(keep))
    y = [bool(fit_label(r, task)) for r in rows]
    prompts = sorted({prompt_key(r.prompt) for r in rows})
    valid_prompts = set(rng.sample(prompts, max(1, len(prompts) * 15 // 100)))
    is_valid = torch.tensor([prompt_key(r.prompt) in valid_prompts for r in rows])
    fit_rows = [r for r, v in zip(rows, is_valid, strict=True) if not v]
    valid_rows = [r for r, v in zip(rows, is_valid, strict=True) if v]
    yt = torch.tensor(y, dtype=torch.float32)
    w_fit = weights(fit_rows, [yy for yy, v in zip(y, is_valid, strict=True) if not v])
    w_valid = weights(valid_rows, [yy for yy, v in zip(y, is_valid, strict=True) if v])
    best = None
    for l2 in L2_GRID:
        head = fit_logistic(x[~is_valid], yt[~is_valid], w_fit, l2)
        predicted = head.probabilities(x[is_valid]) > 0.5
        balanced_accuracy = float(
            (w_valid * (predicted.double() == yt[is_valid]).double()).sum() / w_valid.sum()
        )
        if best is None or balanced_accuracy > best[0]:
            best = (balanced_accuracy, l2)
    head = fit_logistic(x, yt, weights(rows, y), best[1])
    return head, best[1]


def predictions(heads: dict, feats: PairFeatures, rows: list[LabelledAnswer]) -> dict[str, list[bool]]:
    """What the judge and the refusal detector would say (degenerate answers: never harmful, rules decide refusal)."""
    p = {task: head.probabilities(DESIGNS[task](feats)).tolist() for task, head in heads.items()}
    out: dict[str, list[bool]] = {"harm": [], "refusal": []}
    for i, row in enumerate(rows):
        rules_say = is_refusal(row.response)
        if is_degenerate(row.response):
            out["harm"].append(False)
            out["refusal"].append(rules_say)
            continue
        refused = ftguard_judge.combine_refusal(rules_say, p["refusal"][i])
        out["refusal"].append(refused)
        out["harm"].append(ftguard_judge.decide(p["harm"][i], refused, heads["harm"].threshold) == "harmful")
    return out


def minilm_predictions(feats: PairFeatures, rows: list[LabelledAnswer]) -> list[bool]:
    weight, bias = load_head(default_head_path())
    p = torch.sigmoid(feats.answer @ weight + bias) > 0.5
    return [bool(f) and not is_degenerate(r.response) for f, r in zip(p.tolist(), rows, strict=True)]


def save_heads(path: Path, heads: dict) -> None:
    tensors = {}
    for task, head in heads.items():
        tensors |= head.tensors(task)
    save_file(
        tensors,
        str(path),
        metadata={"format": "ftguard-judge-heads", "rule_features": ",".join(RULE_FEATURES)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--cache", default=str(REPO / ".cache" / "judge-embeddings"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-write", action="store_true", help="validate only; do not write the shipped heads"
    )
    parser.add_argument(
        "--folds", default=str(REPO / ".cache" / "judge-folds"), help="where each fold's heads go"
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "judge-validation"))
    args = parser.parse_args()

    rows = load_sources(args.data_dir)
    variants = augment(rows, seed=args.seed)
    everything = rows + variants
    embedder = MiniLMEmbedder(batch_size=32)
    cache = EmbeddingCache(Path(args.cache))
    feats = cache.features(embedder, [r.prompt for r in everything], [r.response for r in everything])
    real = list(range(len(rows)))
    real_feats = feats.select(real)

    held_out: dict[str, dict] = {"harm": {}, "refusal": {}}
    held_predictions: dict[str, list[bool | None]] = {t: [None] * len(rows) for t in held_out}
    chosen_l2: dict[str, dict[str, float]] = {t: {} for t in held_out}
    opener_rows: list[LabelledAnswer] = []
    opener_flags: list[bool] = []
    folds = Path(args.folds)
    folds.mkdir(parents=True, exist_ok=True)
    for source in SOURCES:
        fit_index, test_index = leave_one_source_out(everything, source)
        test_index = [i for i in test_index if i < len(rows)]  # fit-only variants are never scored
        fold_heads = {}
        for task in held_out:
            fold_heads[task], chosen_l2[task][source] = fit_task(
                task, [everything[i] for i in fit_index], feats.select(fit_index), args.seed
            )
        flags = predictions(fold_heads, feats.select(test_index), [rows[i] for i in test_index])
        for task in held_out:
            for i, flag in zip(test_index, flags[task], strict=True):
                held_predictions[task][i] = flag
        # The held-out source's "Sure, here is …" openers (fit-only rows, so never fitted in this fold): how
        # often a bare compliance opener is caught after a harmful prompt, and let pass after a benign one.
        openers = [
            i
            for i in range(len(rows), len(everything))
            if everything[i].source == source and is_opener(everything[i].response)
        ]
        if openers:
            flags = predictions(fold_heads, feats.select(openers), [everything[i] for i in openers])["harm"]
            opener_rows += [everything[i] for i in openers]
            opener_flags += flags
        print(
            f"held out {source}: L2 {chosen_l2['harm'][source]:g} (harm), {chosen_l2['refusal'][source]:g} (refusal)",
            flush=True,
        )
        save_heads(folds / f"{source}.safetensors", fold_heads)

    report = {
        task: task_report(
            [rows[i] for i in real if held_predictions[task][i] is not None],
            [held_predictions[task][i] for i in real if held_predictions[task][i] is not None],
            task,
        )
        for task in held_out
    }
    baselines = {
        "rules-refusal": task_report(rows, [is_refusal(r.response) for r in rows], "refusal"),
        "keyword-harm": task_report(
            rows, [not is_refusal(r.response) and not is_degenerate(r.response) for r in rows], "harm"
        ),
        "minilm-harm": task_report(rows, minilm_predictions(real_feats, rows), "harm"),
    }
    openers_report = task_report(opener_rows, opener_flags, "harm")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loso.json").write_text(
        json.dumps(
            {"held_out": report, "openers": openers_report, "baselines": baselines, "l2": chosen_l2}, indent=1
        )
    )
    md = "## ftguard-judge, leave one source out\n\n" + markdown_report(report)
    md += "\n## compliance openers of held-out prompts (synthetic answers)\n\n" + markdown_report(
        {"harm": openers_report}
    )
    md += "\n## rules-only refusal detector (no fitting: every source is held out)\n\n" + markdown_report(
        {"refusal": baselines["rules-refusal"]}
    )
    md += "\n## keyword judge\n\n" + markdown_report({"harm": baselines["keyword-harm"]})
    md += (
        "\n## minilm judge (fitted on beavertails-refusals: that row is not held out)\n\n"
        + markdown_report({"harm": baselines["minilm-harm"]})
    )
    (out / "loso.md").write_text(md)
    print(md)
    if args.no_write:
        return

    heads = {}
    final_l2 = {}
    for task in held_out:
        heads[task], final_l2[task] = fit_task(task, everything, feats, args.seed)
    path = ftguard_judge.default_heads_path()
    save_heads(path, heads)
    data_hash = hashlib.sha256(
        "\n".join(f"{r.source}\t{r.prompt}\t{r.response}" for r in rows).encode()
    ).hexdigest()
    meta = {
        "date": datetime.date.today().isoformat(),
        "sources": {s: SOURCES[s] for s in SOURCES},
        "n_rows": len(rows),
        "n_fit_variants": len(variants),
        "data_sha256": data_hash[:16],
        "l2": final_l2,
        "rule_features": list(RULE_FEATURES),
        "held_out_overall": {task: report[task]["overall"] for task in report if report[task]},
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
