"""Fit `ftguard-cross-judge` (MiniLM tuned end to end with LoRA on prompt-answer pairs) and score held-out sources.

    python scripts/train_cross_judge.py --data-dir ../shared/data --output W.safetensors [--hold SOURCE ...]
        [--report OUT.json] [--epochs 1] [--lr 5e-4] [--max-length 256]

Fit rows: every people-labelled harm row of the labelled sources (docs/judges.md), the large ones capped (``CAPS``)
so that no one source's style decides; with ``--hold``, every row that shares a prompt with a held-out source is
left out of the fit (``leave_one_source_out``) and the held-out sources are scored (``--report``). The bundled
weights (src/ftguard/assets/ftguard_cross_judge.safetensors) are this script's fit on every source, 1 epoch,
seed 0, bf16 autocast on a CPU with native bf16 (about 35 min on one busy core); a refit elsewhere differs in
the last bits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ftguard.evaluation.judges.cross_encoder import (
    CrossEncoderClassifier,
    CrossEncoderScorer,
    load_weights,
    save_weights,
)
from ftguard.evaluation.judges.minilm import MAX_LENGTH, embedder_path
from ftguard.evaluation.labelled import LabelledAnswer, leave_one_source_out
from ftguard.evaluation.labelled_sources import load_sources
from ftguard.evaluation.stats import wilson_interval

# At most this many fit rows per (source, harmful): BeaverTails' refusal pairs, GPTFuzz's refusals and the benign
# sources would otherwise be 60% of the fit.
CAPS = {
    ("beavertails-refusals", True): 1000,
    ("beavertails-refusals", False): 1000,
    ("gptfuzz", False): 1000,
    ("dolly", False): 500,
    ("lima", False): 300,
    ("alpaca-eval", False): 300,
    ("safety-tuned-llamas", False): 600,
}


def fit_rows(rows: list[LabelledAnswer], held_out: list[str], seed: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) row indices: no fit row shares a prompt with a held-out source; large groups capped."""
    fit, held = set(range(len(rows))), []
    for source in held_out:
        keep, test = leave_one_source_out(rows, source)
        fit &= set(keep)
        held += test
    groups: dict[tuple[str, bool], list[int]] = {}
    for i in sorted(fit):
        groups.setdefault((rows[i].source, bool(rows[i].harmful)), []).append(i)
    rng = random.Random(seed)
    chosen = []
    for key, members in groups.items():
        rng.shuffle(members)
        chosen += members[: CAPS.get(key, len(members))]
    rng.shuffle(chosen)
    return chosen, sorted(held)


def train(model: CrossEncoderClassifier, tokenizer, rows: list[LabelledAnswer], args) -> None:
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    encoded = tokenizer(
        [r.prompt for r in rows],
        [r.response for r in rows],
        truncation="longest_first",
        max_length=args.max_length,
    )
    data = Dataset.from_dict(dict(encoded) | {"labels": [int(bool(r.harmful)) for r in rows]})
    training = TrainingArguments(
        output_dir=str(args.work_dir),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        warmup_steps=0.06,
        weight_decay=0.01,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        train_sampling_strategy="group_by_length",
        seed=args.seed,
    )
    Trainer(
        model=model, args=training, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer)
    ).train()


def held_out_report(scorer: CrossEncoderScorer, rows: list[LabelledAnswer], threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, FPR (%, 95% Wilson) per held-out source, from the harm probability alone."""
    report = {}
    for source in sorted({r.source for r in rows}):
        mine = [r for r in rows if r.source == source]
        flags = [
            p > threshold for p in scorer.probabilities([r.prompt for r in mine], [r.response for r in mine])
        ]
        truth = [bool(r.harmful) for r in mine]
        counts = Counter(zip(flags, truth, strict=True))
        tp, fp, fn, tn = counts[True, True], counts[True, False], counts[False, True], counts[False, False]

        def rate(k: int, n: int) -> list[float] | None:
            return [100 * k / n, *wilson_interval(k, n)] if n else None

        report[source] = {
            "n": len(mine),
            "positives": tp + fn,
            "accuracy": rate(tp + tn, len(mine)),
            "precision": rate(tp, tp + fp),
            "recall": rate(tp, tp + fn),
            "fpr": rate(fp, fp + tn),
        }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True, help="the weights file (.safetensors)")
    parser.add_argument("--hold", nargs="*", default=[], metavar="SOURCE", help="sources held out and scored")
    parser.add_argument("--report", type=Path, help="held-out numbers (JSON)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/cross-judge"))
    args = parser.parse_args(argv)
    if args.output.suffix != ".safetensors":
        raise SystemExit(f"--output must be a .safetensors file, got {args.output}")
    if args.hold and not args.report:
        raise SystemExit("--hold scores the held-out sources: give --report OUT.json for their numbers")
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(args.seed)
    rows = [r for r in load_sources(args.data_dir) if r.harmful is not None]
    unknown = sorted(set(args.hold) - {r.source for r in rows})
    if unknown:
        raise SystemExit(
            f"--hold: no labelled source {unknown}; the sources are {sorted({r.source for r in rows})}"
        )
    fit, held = fit_rows(rows, args.hold, args.seed)
    print(f"fit on {len(fit)} rows ({sum(bool(rows[i].harmful) for i in fit)} harmful), {len(held)} held out")
    tokenizer = AutoTokenizer.from_pretrained(embedder_path())
    model = CrossEncoderClassifier(AutoModel.from_pretrained(embedder_path(), dtype=torch.float32))
    train(model, tokenizer, [rows[i] for i in fit], args)
    model.eval()
    fitted = {
        "sources": sorted({rows[i].source for i in fit}),
        "held_out": args.hold,
        "rows": len(fit),
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "precision": "bf16 autocast" if args.bf16 else "fp32",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_weights(
        args.output,
        model,
        max_length=args.max_length,
        extra={"date": str(datetime.date.today()), "fit": fitted},
    )
    if held:
        model.load_trained_tensors(
            load_weights(args.output)[0]
        )  # the held-out report scores the stored weights
        scorer = CrossEncoderScorer(model, tokenizer, max_length=args.max_length, device=args.device)
        report = {"fit": fitted, "by_source": held_out_report(scorer, [rows[i] for i in held])}
        args.report.write_text(json.dumps(report, indent=1) + "\n")
        for source, r in report["by_source"].items():
            print(f"{source}: n {r['n']}, accuracy {r['accuracy'][0]:.1f}")


if __name__ == "__main__":
    main()
