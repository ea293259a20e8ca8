"""Benign user fine-tuning tasks and their evaluation sets (docs/methods.md, User data and Finetune accuracy).

Instructions and outputs follow the git-disl ``build_dataset.py`` scripts (Vaccine/Lisa) word for word.
``n`` always takes the first n rows, never a shuffle, as the papers do.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ftguard.data.example import Example
from ftguard.data.sources import (
    DATA_ROOT_BUNDLED,
    DOLLY,
    cached_rows,
    data_file,
    get_str,
    read_json_list,
    read_jsonl,
    read_text,
    resolve_root,
    unknown_name_error,
)
from ftguard.errors import FtguardError

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
SST2_LABELS = ("negative", "positive")  # GLUE label 0, 1

# Exactly as git-disl Vaccine ag_news/build_dataset.py and Lisa agnews/build_dataset.py (and every
# agnews pred_eval.py of Vaccine/Lisa/Booster): the category list ends with a newline.
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")  # CSV class 1..4
AGNEWS_EVAL_ROWS = 1000  # papers evaluate the first 500 (Vaccine) or 1000 (Lisa/Booster) test rows

GSM8K_COT_SUFFIX = "\nFirst think step by step and then answer the final number.\n"  # Vaccine only
GSM8K_ANSWER_PROMPT = "The final answer is: "

# Lisa and Booster score AlpacaEval on the items with index > 700 only (docs/methods.md, Finetune accuracy).
ALPACA_EVAL_FILE = "alpaca_eval/alpaca_eval_805_example_outputs.json"
ALPACA_EVAL_FIRST = 701
ALPACA_EVAL_ITEMS = 805

ROLES = ("train", "eval")


@dataclass(frozen=True)
class Task:
    """A benign task: how to load its data and how its answers are scored.

    ``metric`` is ``"label"`` (the answer is one of ``labels``; ``aliases`` are the extra strings that
    Vaccine's substring rule also accepts), ``"gsm8k"`` (numeric answer) or ``"winrate"`` (a free-form answer
    judged against a reference answer, ``evaluate.pairwise_judge``). Eval examples carry the gold or reference
    answer in ``output``.
    """

    name: str
    metric: str
    labels: tuple[str, ...] = ()
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    instruction: str = ""
    cot_suffix: bool = False
    loader: Callable[[Task, Path, str], list[Example]] | None = field(
        default=None, repr=False, compare=False, hash=False
    )
    data_files: tuple[str, ...] = ()  # relative to the data root; hashed into the results

    def files(self, root: str | Path = DATA_ROOT_BUNDLED) -> list[Path]:
        """The task's files that exist under ``root`` (for the source hashes recorded with results)."""
        base = resolve_root(root)
        return [base / rel for rel in self.data_files if (base / rel).is_file()]

    def train_examples(self, root: str | Path = DATA_ROOT_BUNDLED, n: int | None = None) -> list[Example]:
        return self._examples(root, "train", n)

    def eval_examples(self, root: str | Path = DATA_ROOT_BUNDLED, n: int | None = None) -> list[Example]:
        return self._examples(root, "eval", n)

    def _examples(self, root: str | Path, role: str, n: int | None) -> list[Example]:
        if n is not None and (not isinstance(n, int) or n < 0):
            raise FtguardError(f"task {self.name!r}: n must be a non-negative integer, got {n!r}")
        assert self.loader is not None, f"task {self.name} has no loader"
        base = resolve_root(root)
        loader = self.loader
        rows = cached_rows(
            ("task", self, id(loader), str(base), role),
            self.files(base),
            lambda: loader(self, base, role),
        )
        if n is None:
            return rows
        if n > len(rows):
            raise FtguardError(
                f"task {self.name!r} has {len(rows)} {role} examples under data root '{root}' but n={n} were "
                "requested: lower n, or set data.root to the full data (../shared/data)"
            )
        return rows[:n]


# ---------------------------------------------------------------- SST-2


def _read_sst2(task: Task, root: Path, role: str) -> list[Example]:
    # test.tsv is the labelled GLUE dev set (872 rows) that the papers report as "validation".
    split = "train" if role == "train" else "test"
    file = data_file(root, f"sst2/{split}.tsv")
    lines = io.StringIO(read_text(file), newline=None).read().split("\n")
    if lines[0].rstrip("\r").split("\t") != ["sentence", "label"]:
        raise FtguardError(f"{file}, line 1: expected the header 'sentence<TAB>label', got {lines[0][:60]!r}")
    out = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) != 2 or parts[1].strip() not in ("0", "1"):
            raise FtguardError(
                f"{file}, line {lineno}: expected 'sentence<TAB>0|1', got {line[:60]!r}: fix or remove that line"
            )
        sentence = parts[0].strip()  # GLUE sentences end with a space; the template needs none
        if not sentence:
            raise FtguardError(f"{file}, line {lineno}: empty sentence: fill it in or remove that line")
        out.append(
            Example(
                instruction=task.instruction,
                input=sentence,
                output=SST2_LABELS[int(parts[1])],
                source=f"sst2/{split}#{len(out)}",
            )
        )
    return out


# ---------------------------------------------------------------- AG News


def _read_agnews_csv(file: Path) -> list[tuple[int, str, str]]:
    """(row index, label name, text) like the HF ``ag_news`` script: text = title + " " + description."""
    rows = []
    text = io.StringIO(read_text(file), newline="")
    reader = csv.reader(text, quotechar='"', delimiter=",", quoting=csv.QUOTE_ALL, skipinitialspace=True)
    for i, row in enumerate(reader):
        if len(row) != 3 or row[0] not in ("1", "2", "3", "4"):
            raise FtguardError(
                f"{file}, row {i + 1} (line {reader.line_num}): expected 'class(1-4),title,description', got "
                f"{','.join(row)[:60]!r}: fix or remove that row"
            )
        rows.append((i, AGNEWS_LABELS[int(row[0]) - 1], f"{row[1]} {row[2]}".strip()))
    return rows


def _read_agnews(task: Task, root: Path, role: str) -> list[Example]:
    # The papers train on HF ag_news "train" (120k) and evaluate on the first 500/1000 "test" rows. Offline
    # only test.csv exists, so its first AGNEWS_EVAL_ROWS rows are the eval set and the rest the train set
    # (disjoint). A root that also has the official ag_news/train.csv trains on that instead.
    official_train = root / "ag_news" / "train.csv"
    if role == "train" and official_train.is_file():
        rows, split = _read_agnews_csv(official_train), "train"
    else:
        rows, split = _read_agnews_csv(data_file(root, "ag_news/test.csv")), "test"
        rows = rows[:AGNEWS_EVAL_ROWS] if role == "eval" else rows[AGNEWS_EVAL_ROWS:]
    return [
        Example(instruction=task.instruction, input=text, output=label, source=f"ag_news/{split}#{i}")
        for i, label, text in rows
    ]


# ---------------------------------------------------------------- GSM8K


def _read_gsm8k(task: Task, root: Path, role: str) -> list[Example]:
    split = "train" if role == "train" else "test"
    file = data_file(root, f"gsm8k/{split}.jsonl")
    suffix = GSM8K_COT_SUFFIX if task.cot_suffix else ""
    out = []
    for i, (lineno, row) in enumerate(read_jsonl(file)):
        where = f"{file}, line {lineno}"
        answer = get_str(row, "answer", where)
        if "####" not in answer:
            raise FtguardError(f"{where}: field 'answer' has no '#### <number>' final answer")
        out.append(
            Example(
                instruction=get_str(row, "question", where) + suffix,
                # Verbatim replace as in build_dataset.py: "#### 72" becomes "The final answer is:  72".
                output=answer.replace("####", GSM8K_ANSWER_PROMPT),
                source=f"gsm8k/{split}#{i}",
            )
        )
    return out


# ---------------------------------------------------------------- AlpacaEval


def _read_alpaca_eval(task: Task, root: Path, role: str) -> list[Example]:
    # Training: the papers expect a data/alpaca.json that no repo builds (docs/methods.md, User data); ftguard
    # trains on Dolly's human-written instruction answers instead. Evaluation: AlpacaEval items 701-804, as
    # Lisa/Booster, each with the reference answer that the judge compares against. Those references are the
    # outputs of tatsu-lab/alpaca_eval's example/outputs.json, not AlpacaEval 1's text-davinci-003 outputs: win
    # rates compare ftguard runs with each other, not with the papers'.
    if role == "train":
        file = data_file(root, DOLLY)
        return [
            Example(
                instruction=get_str(row, "instruction", f"{file}, line {lineno}"),
                input=get_str(row, "input", f"{file}, line {lineno}", required=False),
                output=get_str(row, "output", f"{file}, line {lineno}"),
                source=f"dolly/train#{i}",
            )
            for i, (lineno, row) in enumerate(read_jsonl(file))
        ]
    file = data_file(root, ALPACA_EVAL_FILE)
    items = read_json_list(file)
    if len(items) < ALPACA_EVAL_ITEMS or "output" not in items[-1]:
        raise FtguardError(
            f"task 'alpaca_eval' scores AlpacaEval items {ALPACA_EVAL_FIRST}-{ALPACA_EVAL_ITEMS - 1} with their "
            f"reference outputs, which {file} lacks ({len(items)} items): set data.root to the full data "
            "(../shared/data)"
        )
    return [
        Example(
            instruction=get_str(item, "instruction", f"{file}, item {i}"),
            output=get_str(item, "output", f"{file}, item {i}"),
            source=f"alpaca_eval/eval#{i}",
        )
        for i, item in enumerate(items)
        if i >= ALPACA_EVAL_FIRST
    ]


TASKS: dict[str, Task] = {
    "sst2": Task(
        name="sst2",
        metric="label",
        labels=SST2_LABELS,
        aliases={"negative": ("Negative",), "positive": ("Positive",)},
        instruction=SST2_INSTRUCTION,
        loader=_read_sst2,
        data_files=("sst2/train.tsv", "sst2/test.tsv"),
    ),
    "ag_news": Task(
        name="ag_news",
        metric="label",
        labels=AGNEWS_LABELS,
        aliases={"World": ("world",), "Sports": ("sports",), "Business": ("business",), "Sci/Tech": ("sci",)},
        instruction=AGNEWS_INSTRUCTION,
        loader=_read_agnews,
        data_files=("ag_news/train.csv", "ag_news/test.csv"),
    ),
    "gsm8k": Task(
        name="gsm8k", metric="gsm8k", loader=_read_gsm8k, data_files=("gsm8k/train.jsonl", "gsm8k/test.jsonl")
    ),
    "alpaca_eval": Task(
        name="alpaca_eval", metric="winrate", loader=_read_alpaca_eval, data_files=(DOLLY, ALPACA_EVAL_FILE)
    ),
}


def get_task(name: str, *, cot_suffix: bool = False) -> Task:
    """A registered task; ``cot_suffix=True`` (GSM8K only) appends Vaccine's chain-of-thought cue."""
    if name not in TASKS:
        raise unknown_name_error("task", name, tuple(TASKS))
    if cot_suffix and name != "gsm8k":
        raise FtguardError(
            f"cot_suffix only applies to task 'gsm8k', not {name!r}: remove it from the task config"
        )
    return replace(TASKS[name], cot_suffix=True) if cot_suffix else TASKS[name]
