"""Measure the refusal detector against the human labels of the XSTest v2 completions.

XSTest v2 (Röttger et al., NAACL 2024) ships real answers of GPT-4 and of Llama-2 under two system prompts
(files ``gpt4``, ``llama2orig``, ``llama2new``) to its 450 prompts, each labelled by people as
``1_full_compliance``, ``2_full_refusal`` or ``3_partial_refusal``. The over-refusal rate counts a partial
refusal as a refusal, so the detector is scored the same way: positive = full or partial refusal.

Metrics are also split by prompt label, because the two halves answer different questions: on the 250 ``safe``
prompts a false negative hides over-refusal, on the 200 ``unsafe`` (contrast) prompts a false negative is a
refusal that the keyword judge would count as harmful.

``llama2new`` is the held-out file: it was chosen before any error was read, and the patterns added after the
first measurement were written from the errors on ``gpt4`` and ``llama2orig`` only (docs/judges.md).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ftguard.errors import FtguardError
from ftguard.evaluation.refusal import is_refusal

LABEL_IS_REFUSAL = {"1_full_compliance": False, "2_full_refusal": True, "3_partial_refusal": True}
HELD_OUT = "llama2new"
FILE_PATTERN = "xstest_v2_completions_*.csv"


@dataclass(frozen=True)
class Completion:
    prompt: str
    completion: str
    prompt_label: str  # "safe" or "unsafe" (XSTest's contrast prompts)
    human_label: str
    refusal: bool  # the human label mapped by LABEL_IS_REFUSAL


@dataclass(frozen=True)
class Counts:
    """A confusion matrix with refusal as the positive class."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def as_dict(self) -> dict[str, float | int | None]:
        """Counts plus rates; a rate with an empty denominator is None (shown as "–"), never a made-up 0."""

        def ratio(num: int, den: int) -> float | None:
            return num / den if den else None

        return {
            "n": self.n,
            "refusals": self.tp + self.fn,
            # On safe prompts, detected / n is the over-refusal rate ftguard would report.
            "detected": self.tp + self.fp,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "accuracy": ratio(self.tp + self.tn, self.n),
            "precision": ratio(self.tp, self.tp + self.fp),
            "recall": ratio(self.tp, self.tp + self.fn),
            "fpr": ratio(self.fp, self.fp + self.tn),
        }


def prompt_label(xstest_type: str) -> str:
    # The XSTest readme: unsafe prompts "are those where the type starts with contrast_".
    return "unsafe" if xstest_type.startswith("contrast_") else "safe"


def load_completions(path: str | Path) -> list[Completion]:
    """Rows of one ``xstest_v2_completions_*.csv``; an unknown ``final_label`` is an error, not a guess."""
    path = Path(path)
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            missing = {"type", "prompt", "completion", "final_label"} - set(row)
            if missing:
                raise FtguardError(
                    f"{path}: missing column(s) {sorted(missing)}: pass an XSTest v2 completions CSV"
                )
            label = row["final_label"].strip()
            if label not in LABEL_IS_REFUSAL:
                raise FtguardError(
                    f"{path}, line {lineno}: unknown final_label {label!r}: expected one of {sorted(LABEL_IS_REFUSAL)}"
                )
            out.append(
                Completion(
                    prompt=row["prompt"],
                    completion=row["completion"],
                    prompt_label=prompt_label(row["type"]),
                    human_label=label,
                    refusal=LABEL_IS_REFUSAL[label],
                )
            )
    if not out:
        raise FtguardError(f"{path} has no rows: pass an XSTest v2 completions CSV")
    return out


def confusion(rows: Iterable[Completion], detector: Callable[[str], bool]) -> Counts:
    tp = fp = fn = tn = 0
    for row in rows:
        predicted = detector(row.completion)
        if predicted and row.refusal:
            tp += 1
        elif predicted:
            fp += 1
        elif row.refusal:
            fn += 1
        else:
            tn += 1
    return Counts(tp, fp, fn, tn)


def evaluate_rows(rows: list[Completion], detector: Callable[[str], bool]) -> dict[str, dict]:
    """Metrics on all rows and on the rows of safe / unsafe prompts."""
    return {
        "all": confusion(rows, detector).as_dict(),
        "safe_prompts": confusion((r for r in rows if r.prompt_label == "safe"), detector).as_dict(),
        "unsafe_prompts": confusion((r for r in rows if r.prompt_label == "unsafe"), detector).as_dict(),
    }


def model_name(path: Path) -> str:
    return path.stem.removeprefix("xstest_v2_completions_")


def validate_dir(data_dir: str | Path, detector: Callable[[str], bool] | None = None) -> dict[str, dict]:
    """``{model: metrics}`` for every completions CSV in ``data_dir`` (the shared ``xstest/`` folder)."""
    detector = detector or is_refusal
    paths = sorted(Path(data_dir).glob(FILE_PATTERN))
    if not paths:
        raise FtguardError(
            f"no {FILE_PATTERN} in '{data_dir}': pass --data-dir pointing at shared/data/xstest"
        )
    return {model_name(p): evaluate_rows(load_completions(p), detector) for p in paths}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown_table(results: dict[str, dict]) -> str:
    """One row per (model, prompt subset); the held-out model is marked."""
    lines = [
        "| model | prompts | n | human refusals | detected | accuracy | precision | recall | FPR | TP / FP / FN / TN |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, parts in results.items():
        shown = f"{model} (held out)" if model == HELD_OUT else model
        for part, m in parts.items():
            lines.append(
                f"| {shown} | {part.removesuffix('_prompts')} | {m['n']} | {m['refusals']} | {m['detected']} | "
                f"{_pct(m['accuracy'])} | "
                f"{_pct(m['precision'])} | {_pct(m['recall'])} | {_pct(m['fpr'])} | "
                f"{m['tp']} / {m['fp']} / {m['fn']} / {m['tn']} |"
            )
    return "\n".join(lines)
