#!/usr/bin/env python
"""Cut the small offline data subset shipped in src/ftguard/data/bundled/ from ../shared/data.

The subset keeps the layout and file formats of ../shared/data, so every loader in ftguard.data works on
either root. Selection is deterministic: always the first rows of each file (the papers take the first n
rows too). Rerun after changing the row counts below:

    python scripts/make_bundled_data.py [--src ../shared/data]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / "src" / "ftguard" / "data" / "bundled"
MAX_BYTES = 1_900_000  # "under 2 MB": the package must stay small

BT = (
    "shuhao02/SPARD @ c70f8c15f272ff12037e0983ab4016be020dd5b5",
    "no licence file in the repo; data derived from BeaverTails (CC BY-NC 4.0)",
)
GSM = ("openai/grade-school-math @ 3101c7d5072418e28b9008a6636bde82a006892c", "MIT")
SST = (
    "forest-snow/alps @ 3c7ef2c98249fc975a897b27f275695f97d5b7a9",
    "repo MIT; SST-2 (GLUE) has no explicit licence",
)
AG = (
    "suuuch/TransformerClassification @ 0d9808e1978c8468b4f8f08a44c5be99d058aa7b",
    "AG corpus: research / non-commercial use only",
)
AE = (
    "tatsu-lab/alpaca_eval @ cd543a149df89434d8a54582c0151c0b945c3d20",
    "data CC BY-NC 4.0 (code Apache-2.0)",
)
STL = ("vinid/safety-tuned-llamas @ 36a4b8d5c2177ed165bf61f59b590161394f7f12", "data CC BY-NC 4.0")
XST = ("paul-rottger/exaggerated-safety @ d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d", "CC BY 4.0")
DOLLY = (
    "haguirrezabalb/ll-hallucination-pipeline @ b1ab10bdf1210d0ee8700e450b3048512db446d1",
    "databricks-dolly-15k: CC BY-SA 3.0",
)


@dataclass(frozen=True)
class Cut:
    rel: str  # same relative path under ../shared/data and under bundled/
    kind: str  # "lines": first lines verbatim; "json": first items of a JSON list; "csv": first rows, some columns
    rows: int  # data rows kept (a header line is extra)
    origin: tuple[str, str]  # (repo @ commit, licence)
    upstream_path: str
    header: bool = False
    drop_keys: tuple[str, ...] = ()  # JSON keys or CSV columns left out
    indent: int = 2
    note: str = ""
    without: str | None = None  # "lines" of JSON objects: keep only rows whose field of this name is empty


CUTS = [
    Cut(
        "beavertails_refusals/train.jsonl",
        "lines",
        600,
        BT,
        "datasets/safe_data/train/beaverTails_train.jsonl",
        note="prompt + refusal (`safe`) + harmful answer (`unsafe`); contains harmful text on purpose",
    ),
    Cut(
        "beavertails_refusals/test.jsonl",
        "lines",
        160,
        BT,
        "datasets/safe_data/eval/beaverTails_test.jsonl",
        note="held-out harmful prompts; no prompt overlaps with train",
    ),
    Cut("sst2/train.tsv", "lines", 799, SST, "data/SST-2/train.tsv", header=True, note="800 lines in all"),
    Cut(
        "sst2/test.tsv",
        "lines",
        200,
        SST,
        "data/SST-2/test.tsv",
        header=True,
        note="the labelled GLUE dev set (first 200 of 872)",
    ),
    Cut(
        "ag_news/test.csv",
        "lines",
        1600,
        AG,
        "data/ag_news_csv/test.csv",
        note="rows 1-1000 are the eval set, rows 1001-1600 the train set (ftguard.data.tasks rule)",
    ),
    Cut("gsm8k/train.jsonl", "lines", 300, GSM, "grade_school_math/data/train.jsonl"),
    Cut("gsm8k/test.jsonl", "lines", 100, GSM, "grade_school_math/data/test.jsonl"),
    Cut(
        "alpaca_eval/alpaca_eval_805_example_outputs.json",
        "json",
        150,
        AE,
        "example/outputs.json",
        drop_keys=("output",),
        note="the example model `output` field is dropped to save space",
    ),
    Cut(
        "safety_tuned_llamas/safety_only_data_Instructions.json",
        "json",
        100,
        STL,
        "data/training/safety_only_data_Instructions.json",
        indent=4,
        note="harmful instructions with refusal outputs (alignment data)",
    ),
    Cut(
        "xstest/xstest_prompts.csv",
        "csv",
        450,
        XST,
        "xstest_prompts.csv",
        header=True,
        drop_keys=("focus", "note"),
        note="all of XSTest v2 (250 `safe`, 200 `unsafe` contrast prompts) for the over-refusal rate; the "
        "annotation columns `focus` and `note` are dropped (ftguard reads `prompt` and `label`)",
    ),
    Cut(
        "dolly_5k/dolly_5k.jsonl",
        "lines",
        600,
        DOLLY,
        "docs/datasets/dolly_5k.jsonl",
        without="input",
        note="benign instructions with human-written answers (the helpful half of helpful-and-harmless "
        "alignment); rows with a context passage are left out to save space",
    ),
]

LICENSE_TEXT = """\
# Licences of the bundled data

The files in this directory are small subsets of public datasets, cut by `scripts/make_bundled_data.py`
(see PROVENANCE.md for the origin of every file). They are **not** covered by ftguard's Apache-2.0
code licence; each keeps the licence of its origin:

- **CC BY-NC 4.0 (non-commercial)**: `beavertails_refusals/` (derived from PKU-Alignment BeaverTails; the
  repository it was copied from ships no licence of its own), `alpaca_eval/` (AlpacaEval data) and
  `safety_tuned_llamas/` (Safety-Tuned LLaMAs data). Attribution: PKU-Alignment (BeaverTails), Tatsu Lab
  (AlpacaEval), Bianchi et al. (Safety-Tuned LLaMAs). Use them for research and tests only, not commercially.
- **MIT**: `gsm8k/` (OpenAI grade-school-math).
- **CC BY-SA 3.0**: `dolly_5k/` (databricks-dolly-15k, Databricks; a seed-42 shuffle of it with Alpaca field
  names, as redistributed by haguirrezabalb/ll-hallucination-pipeline). Attribution: Conover et al., "Free
  Dolly: Introducing the World's First Truly Open Instruction-Tuned LLM" (Databricks, 2023). Share-alike: a
  derivative of these rows keeps CC BY-SA 3.0.
- **CC BY 4.0**: `xstest/` (XSTest v2 prompts, paul-rottger/exaggerated-safety). Attribution: Paul Röttger,
  Hannah Rose Kirk, Bertie Vidgen, Giuseppe Attanasio, Federico Bianchi, Dirk Hovy, "XSTest: A Test Suite for
  Identifying Exaggerated Safety Behaviours in Large Language Models" (NAACL 2024). Changes: the `focus` and
  `note` columns were removed.
- **AG News** (`ag_news/`): the AG corpus is provided "by the academic community for research purposes in
  data mining, information retrieval, ... and any other non-commercial activity" (readme of the AG's News
  Topic Classification Dataset, Zhang, Zhao and LeCun, NIPS 2015). Research / non-commercial use only.
- **SST-2** (`sst2/`): GLUE SST-2 as redistributed by forest-snow/alps (repository MIT); the dataset itself
  states no explicit licence.

**Harmful content on purpose.** `beavertails_refusals/` holds harmful prompts together with harmful answers
(the `unsafe` field), and `safety_tuned_llamas/` holds harmful instructions. They are here on purpose, for
safety research: aligning a model to refuse, simulating a harmful fine-tuning attack and measuring the
harmful score. Do not use them for anything else. The 200 `unsafe` prompts of `xstest/` are unsafe requests
too (contrast prompts for the over-refusal benchmark).
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cut(src: Path, c: Cut) -> bytes:
    raw = (src / c.rel).read_bytes()
    if c.kind == "lines":
        lines = raw.splitlines(keepends=True)
        if c.without:
            lines = [line for line in lines if not json.loads(line).get(c.without)]
        keep = c.rows + (1 if c.header else 0)
        if len(lines) < keep:
            sys.exit(f"{src / c.rel} has {len(lines)} lines, fewer than the {keep} to keep")
        return b"".join(lines[:keep])
    if c.kind == "csv":
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"), newline="")))
        if len(rows) < c.rows:
            sys.exit(f"{src / c.rel} has {len(rows)} rows, fewer than the {c.rows} to keep")
        columns = [k for k in rows[0] if k not in c.drop_keys]
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[: c.rows])
        return out.getvalue().encode("utf-8")
    items = json.loads(raw)[: c.rows]
    items = [{k: v for k, v in item.items() if k not in c.drop_keys} for item in items]
    return (json.dumps(items, indent=c.indent, ensure_ascii=False) + "\n").encode("utf-8")


def provenance(src: Path, written: list[tuple[Cut, bytes]]) -> str:
    out = [
        "# Provenance of the bundled data",
        "",
        "Written by `scripts/make_bundled_data.py` from the offline copies in `../shared/data` (each copied",
        "byte-for-byte from the public GitHub repository named below, see `../shared/data/SOURCES.md`).",
        "Selection: always the **first rows** of the file, no sampling, so reruns give identical files.",
        "JSONL/TSV rows and the AG News CSV lines are copied verbatim; the JSON lists and the XSTest CSV are",
        "re-serialised (same keys and columns, except as noted).",
        "Licences: see LICENSE-DATA.md. Several files are CC BY-NC 4.0 and contain harmful text on purpose.",
        "",
        "| file | data rows | origin repo @ commit | path in repo | selection | licence | sha256 (bundled) | sha256 (cut from) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, data in written:
        origin, licence = c.origin
        what = f"first {c.rows} rows" + (f" with an empty `{c.without}`" if c.without else "")
        what += " + the header line" if c.header else ""
        if c.note:
            what += f"; {c.note}"
        src_hash = sha256((src / c.rel).read_bytes())
        out.append(
            f"| `{c.rel}` | {c.rows} | {origin} | `{c.upstream_path}` | {what} | {licence} | "
            f"`{sha256(data)[:16]}` | `{src_hash[:16]}` |"
        )
    out += ["", "Hashes are the first 16 hex digits of the SHA-256."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data", help="the full offline data")
    ap.add_argument("--dest", type=Path, default=DEST, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.src.is_dir():
        sys.exit(f"source data dir '{args.src}' not found: pass --src pointing at shared/data")

    written = []
    for c in CUTS:
        data = cut(args.src, c)
        target = args.dest / c.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append((c, data))
    (args.dest / "PROVENANCE.md").write_text(provenance(args.src, written), encoding="utf-8")
    (args.dest / "LICENSE-DATA.md").write_text(LICENSE_TEXT, encoding="utf-8")

    # The package ships subsets, never a full copy of an upstream file.
    upstream = {sha256(p.read_bytes()) for p in args.src.rglob("*") if p.is_file()}
    copies = [c.rel for c, data in written if sha256(data) in upstream]
    if copies:
        sys.exit(f"bundled files identical to a file in {args.src}: {copies}")
    total = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    for c, data in written:
        print(f"{c.rel:58s} {c.rows:5d} rows {len(data):9,d} B")
    print(f"total {total:,d} B in {args.dest}")
    if total > MAX_BYTES:
        sys.exit(f"bundled data is {total:,d} B, over the {MAX_BYTES:,d} B budget: lower the row counts")


if __name__ == "__main__":
    main()
