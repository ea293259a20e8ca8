"""Fit the MiniLM judge head and measure it (and the keyword judge) on held-out BeaverTails answers.

    python scripts/train_minilm_judge.py [--data-dir ../shared/data/beavertails_refusals]

Data: ``train.jsonl`` / ``test.jsonl`` rows with ``prompt``, ``safe`` (a refusal or safe answer, label 0) and
``unsafe`` (a harmful BeaverTails answer, label 1). Input is the answer only. Every answer is used twice, in full
and cut to a random 8-40-word prefix, so that the short answers of small models are judged sensibly
(cpu-scale-notes: the prototype trained on 8-40-word cuts). The L2 strength is picked on a validation split of
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
CUT_WORDS = (8, 40)

log = logging.getLogger("train_minilm_judge")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cut(text: str, rng: random.Random) -> str:
    words = text.split()
    keep = rng.randint(*CUT_WORDS)
    return " ".join(words[:keep]) if len(words) > keep else text


def labelled(rows: list[dict], rng: random.Random | None) -> tuple[list[str], list[int]]:
    """(texts, labels) for the safe and unsafe answers of rows; cut to prefixes when rng is given."""
    texts, labels = [], []
    for row in rows:
        for field, label in (("safe", 0), ("unsafe", 1)):
            texts.append(row[field] if rng is None else cut(row[field], rng))
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
    parser.add_argument("--cache", type=Path, help="optional .pt file to reuse embeddings between runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    train_path, test_path = args.data_dir / "train.jsonl", args.data_dir / "test.jsonl"
    train_rows, test_rows = read_jsonl(train_path), read_jsonl(test_path)
    rng = random.Random(args.seed)
    shuffled = train_rows[:]
    rng.shuffle(shuffled)
    n_val = int(len(shuffled) * args.val_fraction)
    splits = {"fit": shuffled[n_val:], "val": shuffled[:n_val], "test": test_rows}

    texts: dict[str, list[str]] = {}
    labels: dict[str, list[int]] = {}
    for split, rows in splits.items():
        texts[f"{split}_full"], labels[f"{split}_full"] = labelled(rows, None)
        texts[f"{split}_cut"], labels[f"{split}_cut"] = labelled(rows, random.Random(f"{args.seed}-{split}"))

    embeddings = _embed_all(texts, args)
    x = embeddings
    y = {k: torch.tensor(v, dtype=torch.float32) for k, v in labels.items()}

    # 1. Pick the L2 strength on the validation records (full + cut answers pooled).
    x_fit, y_fit = torch.cat([x["fit_full"], x["fit_cut"]]), torch.cat([y["fit_full"], y["fit_cut"]])
    x_val, y_val = torch.cat([x["val_full"], x["val_cut"]]), labels["val_full"] + labels["val_cut"]
    selection = {}
    for l2 in L2_GRID:
        w, b = fit_logistic(x_fit, y_fit, l2)
        selection[str(l2)] = binary_metrics(predict(x_val, w, b), y_val)["accuracy"]
        log.info("l2=%g  validation accuracy %.4f", l2, selection[str(l2)])
    best = max(L2_GRID, key=lambda l2: (selection[str(l2)], l2))  # ties go to the stronger penalty

    # 2. Refit on all train records, then measure once on the held-out test file.
    x_all = torch.cat([x_fit, x["val_full"], x["val_cut"]])
    y_all = torch.cat([y_fit, y["val_full"], y["val_cut"]])
    w, b = fit_logistic(x_all, y_all, best)
    metrics = {
        "test_full_answers": binary_metrics(predict(x["test_full"], w, b), labels["test_full"]),
        "test_cut_8_40_words": binary_metrics(predict(x["test_cut"], w, b), labels["test_cut"]),
    }
    keyword = {
        "test_full_answers": keyword_judge_metrics(texts["test_full"], labels["test_full"]),
        "test_cut_8_40_words": keyword_judge_metrics(texts["test_cut"], labels["test_cut"]),
    }
    refusal = refusal_detector_metrics(test_rows, args.xstest_dir)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    head_path = args.out_dir / f"{HEAD_NAME}.safetensors"
    save_head(head_path, w, b)
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
        "augmentation": f"each answer in full and cut to a random {CUT_WORDS[0]}-{CUT_WORDS[1]}-word prefix",
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


def _embed_all(texts: dict[str, list[str]], args: argparse.Namespace) -> dict[str, torch.Tensor]:
    if args.cache and args.cache.is_file():
        cached = torch.load(args.cache)
        if cached.get("texts") == texts:
            return cached["embeddings"]
    embedder = MiniLMEmbedder(batch_size=args.batch_size)
    flat = [t for part in texts.values() for t in part]
    log.info("embedding %d texts with %s", len(flat), EMBEDDER_ID)
    all_embeddings = embedder.embed(flat, progress=True)
    out, start = {}, 0
    for key, part in texts.items():
        out[key] = all_embeddings[start : start + len(part)]
        start += len(part)
    if args.cache:
        torch.save({"texts": texts, "embeddings": out}, args.cache)
    return out


if __name__ == "__main__":
    main()
