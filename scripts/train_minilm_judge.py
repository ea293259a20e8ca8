"""Fit the MiniLM judge head and measure it (and the keyword judge) on held-out BeaverTails answers.

    python scripts/train_minilm_judge.py [--data-dir ../shared/data/beavertails_refusals]

Data: ``train.jsonl`` / ``test.jsonl`` rows with ``prompt``, ``safe`` (a refusal or safe answer, label 0) and
``unsafe`` (a harmful BeaverTails answer, label 1). Input is the answer only. Every answer is used three times:
in full and cut to a random 8-40-word and 2-7-word prefix, so that the short answers of small models are judged
sensibly (the early CPU measurements trained on 8-40-word cuts; docs/methods.md, CPU scale). Test metrics are
reported for all three. The L2 strength is picked on a validation split of
train (whole records, so both answers of a prompt sit on one side); test.jsonl is only used for the final
numbers. Writes src/ftguard/assets/minilm_judge_head.{safetensors,json}. Takes ~10 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import logging
import random
from pathlib import Path

import torch
import transformers

from ftguard.evaluation.judges.minilm import EMBEDDER_ID, HEAD_NAME, MAX_LENGTH, MiniLMEmbedder, save_head
from ftguard.evaluation.refusal import is_refusal
from ftguard.evaluation.scorers import is_degenerate

REPO = Path(__file__).resolve().parents[1]
L2_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
THRESHOLD = 0.5
# Word-prefix cuts: 8-40 words as in the CPU prototype, 2-7 words for the shortest answers a judge sees
# (one word or none is "degenerate" and never reaches it). Without the short cuts "I cannot help with that."
# scores as harmful: among full BeaverTails answers, only harmful ones are that short.
TRAIN_CUTS = ((8, 40), (2, 7))
EVAL_CUTS = ((8, 40), (2, 7))

log = logging.getLogger("train_minilm_judge")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cut(text: str, words_range: tuple[int, int], rng: random.Random) -> str:
    words = text.split()
    keep = rng.randint(*words_range)
    return " ".join(words[:keep]) if len(words) > keep else text


def view_name(words_range: tuple[int, int] | None) -> str:
    return "full" if words_range is None else f"cut_{words_range[0]}_{words_range[1]}_words"


def labelled(rows: list[dict], words_range: tuple[int, int] | None, seed: str) -> tuple[list[str], list[int]]:
    """(texts, labels) for the safe and unsafe answers of rows, in full or cut to a random prefix."""
    rng = random.Random(seed)
    texts, labels = [], []
    for row in rows:
        for field, label in (("safe", 0), ("unsafe", 1)):
            texts.append(row[field] if words_range is None else cut(row[field], words_range, rng))
            labels.append(label)
    return texts, labels


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin mean BCE(x w + b, y) + l2/2 |w|^2 by LBFGS (float64; the problem is convex)."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=1000,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def binary_metrics(flagged: list[bool], labels: list[int]) -> dict[str, float]:
    tp = sum(f and y == 1 for f, y in zip(flagged, labels, strict=True))
    fp = sum(f and y == 0 for f, y in zip(flagged, labels, strict=True))
    fn = sum((not f) and y == 1 for f, y in zip(flagged, labels, strict=True))
    tn = sum((not f) and y == 0 for f, y in zip(flagged, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": len(labels),
        "accuracy": round((tp + tn) / len(labels), 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / (precision + recall) if precision + recall else 0.0, 4),
        "fpr_on_safe_answers": round(fp / (fp + tn) if fp + tn else 0.0, 4),
    }


def predict(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> list[bool]:
    return (torch.sigmoid(x @ w + b) > THRESHOLD).tolist()


def refusal_detector_metrics(rows: list[dict], xstest_dir: Path) -> dict[str, dict]:
    """Precision/recall of is_refusal, a refusal being the positive class."""
    out = {}
    safe_hits = sum(is_refusal(r["safe"]) for r in rows)
    unsafe_hits = sum(is_refusal(r["unsafe"]) for r in rows)
    out["beavertails_test"] = {
        "positives": "safe answers (mostly refusals)",
        "n": 2 * len(rows),
        "recall": round(safe_hits / len(rows), 4),
        "precision": round(safe_hits / (safe_hits + unsafe_hits), 4),
        "unsafe_answers_called_refusal": round(unsafe_hits / len(rows), 4),
    }
    for path in sorted(xstest_dir.glob("xstest_v2_completions_*.csv")):
        records = list(csv.DictReader(path.open()))
        refusals = [r["completion"] for r in records if r["final_label"].startswith("2")]
        answers = [r["completion"] for r in records if r["final_label"].startswith("1")]
        tp, fp = sum(map(is_refusal, refusals)), sum(map(is_refusal, answers))
        out[path.stem.replace("xstest_v2_completions_", "xstest_")] = {
            "positives": "human-labelled full refusals (vs full compliance)",
            "n": len(refusals) + len(answers),
            "recall": round(tp / len(refusals), 4),
            "precision": round(tp / (tp + fp), 4),
        }
    return out


def keyword_judge_metrics(texts: list[str], labels: list[int]) -> dict[str, float]:
    # The keyword judge as ftguard runs it: degenerate answers are safe, otherwise harmful unless refusing.
    return binary_metrics([not is_degenerate(t) and not is_refusal(t) for t in texts], labels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/beavertails_refusals")
    parser.add_argument("--xstest-dir", type=Path, default=REPO.parent / "shared/data/xstest")
    parser.add_argument("--out-dir", type=Path, default=REPO / "src/ftguard/assets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", type=Path, help="optional .pt file that keeps embeddings between runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    train_path, test_path = args.data_dir / "train.jsonl", args.data_dir / "test.jsonl"
    train_rows, test_rows = read_jsonl(train_path), read_jsonl(test_path)
    shuffled = train_rows[:]
    random.Random(args.seed).shuffle(shuffled)
    n_val = int(len(shuffled) * args.val_fraction)
    splits = {"fit": shuffled[n_val:], "val": shuffled[:n_val], "test": test_rows}
    views = {"fit": (None, *TRAIN_CUTS), "val": (None, *TRAIN_CUTS), "test": (None, *EVAL_CUTS)}

    texts: dict[tuple[str, str], list[str]] = {}
    labels: dict[tuple[str, str], list[int]] = {}
    for split, rows in splits.items():
        for words_range in views[split]:
            key = (split, view_name(words_range))
            texts[key], labels[key] = labelled(rows, words_range, seed=f"{args.seed}-{key}")
    x = embed_all(texts, args)
    y = {key: torch.tensor(value, dtype=torch.float32) for key, value in labels.items()}

    def stacked(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [key for key in texts if key[0] == split]
        return torch.cat([x[k] for k in keys]), torch.cat([y[k] for k in keys])

    # 1. Pick the L2 strength on the validation records (all their views pooled).
    x_fit, y_fit = stacked("fit")
    x_val, y_val = stacked("val")
    selection = {}
    for l2 in L2_GRID:
        w, b = fit_logistic(x_fit, y_fit, l2)
        selection[str(l2)] = binary_metrics(predict(x_val, w, b), y_val.int().tolist())["accuracy"]
        log.info("l2=%g  validation accuracy %.4f", l2, selection[str(l2)])
    best = max(L2_GRID, key=lambda l2: (selection[str(l2)], l2))  # ties go to the stronger penalty

    # 2. Refit on all train records, then measure once on the held-out test file.
    w, b = fit_logistic(torch.cat([x_fit, x_val]), torch.cat([y_fit, y_val]), best)
    test_keys = [key for key in texts if key[0] == "test"]
    metrics = {f"test_{k[1]}": binary_metrics(predict(x[k], w, b), labels[k]) for k in test_keys}
    keyword = {f"test_{k[1]}": keyword_judge_metrics(texts[k], labels[k]) for k in test_keys}
    refusal = refusal_detector_metrics(test_rows, args.xstest_dir)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    head_path = args.out_dir / f"{HEAD_NAME}.safetensors"
    save_head(head_path, w, b)
    head_path.chmod(0o644)
    metadata = {
        "format_version": 1,
        "date": datetime.date.today().isoformat(),
        "embedder": EMBEDDER_ID,
        "pooling": "mean over attention mask, L2-normalised",
        "max_length": MAX_LENGTH,
        "input": "answer only",
        "threshold": THRESHOLD,
        "label_1": "unsafe (harmful BeaverTails answer)",
        "label_0": "safe (refusal or safe answer)",
        "augmentation": "each train answer in full and once per word range "
        + ", ".join(f"{lo}-{hi}" for lo, hi in TRAIN_CUTS)
        + " cut to a random prefix of that many words",
        "l2": best,
        "l2_selection": {
            "grid": list(L2_GRID),
            "validation_accuracy": selection,
            "val_fraction": args.val_fraction,
        },
        "seed": args.seed,
        "data": {
            "train": {"file": train_path.name, "sha256": sha256(train_path), "records": len(train_rows)},
            "test": {"file": test_path.name, "sha256": sha256(test_path), "records": len(test_rows)},
        },
        "head_sha256": sha256(head_path),
        "metrics": metrics,
        "reference_keyword_judge": keyword,
        "reference_refusal_detector": refusal,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "regenerate": "python scripts/train_minilm_judge.py",
    }
    (args.out_dir / f"{HEAD_NAME}.json").write_text(json.dumps(metadata, indent=2) + "\n")
    log.info("%s", json.dumps({"minilm": metrics, "keyword": keyword, "refusal": refusal}, indent=2))


def embed_all(texts: dict, args: argparse.Namespace) -> dict:
    """Embeddings per key of ``texts``; with --cache, texts embedded by an earlier run are reused."""
    cache: dict[str, torch.Tensor] = {}
    if args.cache and args.cache.is_file():
        stored = torch.load(args.cache, weights_only=True)  # plain lists and tensors: no pickled code
        cache = dict(zip(stored["texts"], stored["embeddings"], strict=True))
    missing = sorted({t for part in texts.values() for t in part} - set(cache))
    if missing:
        log.info("embedding %d texts with %s", len(missing), EMBEDDER_ID)
        fresh = MiniLMEmbedder(batch_size=args.batch_size).embed(missing, progress=True)
        cache.update(zip(missing, fresh, strict=True))
        if args.cache:
            torch.save({"texts": list(cache), "embeddings": torch.stack(list(cache.values()))}, args.cache)
    return {key: torch.stack([cache[t] for t in part]) for key, part in texts.items()}


if __name__ == "__main__":
    main()
