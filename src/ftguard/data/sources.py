"""Loaders for the alignment / harmful / evaluation prompt sources.

Every source reads the layout of ``../shared/data`` (see its SOURCES.md) under a *data root*; the string
``"bundled"`` selects the small offline subset shipped inside the package. Each row becomes an
:class:`Example` whose ``source`` is ``"<source>/<split>#<row index>"`` (0-based row in the file).

``response`` picks what becomes ``Example.output``:

- ``beavertails_refusals``, ``beavertails``: ``"safe"`` (refusal / harmless answer), ``"unsafe"`` (harmful
  answer) or ``None``/``"prompt"`` (prompt only, ``output=""``).
- ``safety_tuned_llamas``, ``jsonl``, ``dolly``, ``lima``: ``None``/``"output"`` (the ``output`` field, required)
  or ``"prompt"``. ``dolly`` (databricks-dolly, human answers to benign instructions) is bundled in part (600
  rows); ``lima`` (long curated answers, single-turn rows) needs a data root.
- ``alpaca_eval``: prompts only.
- ``xstest``: prompts only; split ``safe`` (250 prompts a calibrated model answers, for the over-refusal
  rate) or ``unsafe`` (the 200 contrast prompts). Its row index counts within the split.

A split may take a slice of its rows, as in Hugging Face datasets: ``test[:100]`` (the first 100),
``test[100:]`` (the rest). Row indices in ``Example.source`` stay those of the whole split, so a validation slice
and a test slice of one file can be checked disjoint. A study tunes on one slice and reports on the other.

Evaluation prompt sets are always read prompt-only, so a user's file of harmful prompts needs no ``output``. Files
must be UTF-8 (a leading BOM is accepted); errors name the file and the 1-based line.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import difflib
import hashlib
import io
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftguard.data.example import Example
from ftguard.errors import DataNotFound, FtguardError

DATA_ROOT_BUNDLED = "bundled"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
PROMPT_ONLY = "prompt"
BEAVERTAILS_HUB_ID = "PKU-Alignment/BeaverTails"
XSTEST_PROMPTS = "xstest/xstest_prompts.csv"
DOLLY = "dolly_5k/dolly_5k.jsonl"  # bundled: its first 600 rows without a context passage
LIMA = "lima/lima.json"  # CC BY-NC-SA and long answers: not bundled, read from a data root
_HUB_SPLITS = {"train": "30k_train", "test": "30k_test", "30k_train": "30k_train", "30k_test": "30k_test"}


def unknown_name_error(kind: str, name: str, known: list[str] | tuple[str, ...]) -> FtguardError:
    """An error for a misspelt registry name, with close matches first."""
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return FtguardError(f"unknown {kind} {name!r}: {hint}known {kind}s: {', '.join(sorted(known))}")


def resolve_root(root: str | Path) -> Path:
    """``"bundled"`` -> the packaged subset; anything else must be an existing directory."""
    if str(root) == DATA_ROOT_BUNDLED:
        return BUNDLED_DIR
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataNotFound(
            f"data root '{root}' does not exist: set data.root to a directory laid out like ../shared/data, "
            "or 'bundled'"
        )
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_file(root: str | Path, relpath: str) -> Path:
    """``<root>/<relpath>``, or an error telling the user how to point data.root at the data."""
    path = resolve_root(root) / relpath
    if not path.is_file():
        raise DataNotFound(
            f"data file '{path}' not found: set data.root to a directory that has {relpath} "
            "(laid out like ../shared/data), or to 'bundled'"
        )
    return path


# ---------------------------------------------------------------- row parsing helpers


def read_text(path: Path) -> str:
    """The whole file decoded as UTF-8 (a leading BOM dropped); bytes that are not UTF-8 fail naming the line.

    Decoding all bytes at once, rather than through a text-mode file, is what makes the byte offset of the bad
    byte (and so its line) known: a text-mode read only reports an offset within its internal chunk.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        body, start = e.object, e.start  # utf-8-sig reports positions after the BOM
        offset = start + (len(data) - len(body))
        line = body.count(b"\n", 0, start) + 1
        raise FtguardError(
            f"{path}, line {line}: byte 0x{body[start]:02x} at byte offset {offset} is not UTF-8: the file must be "
            "UTF-8, re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line; errors name file and line."""
    seen = False
    # newline=None splits lines exactly as a text-mode open() would (\n, \r\n and \r).
    for lineno, line in enumerate(io.StringIO(read_text(path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FtguardError(
                f"{path}, line {lineno}: malformed JSON ({e.msg}): fix or remove that line"
            ) from e
        if not isinstance(row, dict):
            raise FtguardError(
                f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}: each line must hold "
                "one record as a JSON object ({...}) with its fields"
            )
        seen = True
        yield lineno, row
    if not seen:
        raise FtguardError(f"{path} is empty: it needs one JSON object per line")


def read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise FtguardError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from e
    if not isinstance(data, list) or not data:
        raise FtguardError(f"{path}: expected a non-empty JSON list of objects")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise FtguardError(f"{path}, item {i}: expected a JSON object, got {type(item).__name__}")
    return data


def get_str(row: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    """A stripped string field; a required field must be present and non-empty."""
    value = row.get(key)
    if value is None:
        if required:
            raise FtguardError(f"{where}: missing field '{key}': add it to that record or remove the record")
        return ""
    if not isinstance(value, str):
        raise FtguardError(
            f"{where}: field '{key}' must be a string, got {type(value).__name__}: write it as a quoted string"
        )
    value = value.strip()
    if required and not value:
        raise FtguardError(f"{where}: field '{key}' is empty: fill it in or remove the record")
    return value


# ---------------------------------------------------------------- the sources


@dataclass(frozen=True)
class _Source:
    splits: tuple[str, ...] | None  # None: any split name (it only labels the rows)
    responses: tuple[str, ...]
    default_response: str
    files: Callable[[str, str | Path | None], list[str]]  # (split, path) -> paths relative to the root
    load: Callable[[Path | None, str, str, Path | None], list[Example]]
    needs_root: bool = True


def _load_beavertails_refusals(
    root: Path | None, split: str, response: str, path: Path | None
) -> list[Example]:
    file = data_file(root, f"beavertails_refusals/{split}.jsonl")
    out = []
    for i, (lineno, row) in enumerate(read_jsonl(file)):
        where = f"{file}, line {lineno}"
        prompt = get_str(row, "prompt", where)
        answer = "" if response == PROMPT_ONLY else get_str(row, response, where)
        out.append(Example(instruction=prompt, output=answer, source=f"beavertails_refusals/{split}#{i}"))
    return out


# Set while a dry run reads the data: it must not start a download of a hub dataset to count units.
_LOCAL_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("ftguard_data_local_only", default=False)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within this block, hub sources raise DataNotFound instead of downloading."""
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def _load_beavertails_hub(root: Path | None, split: str, response: str, path: Path | None) -> list[Example]:
    hub_split = _HUB_SPLITS[split]
    if _LOCAL_ONLY.get():
        raise DataNotFound(f"{BEAVERTAILS_HUB_ID} is a hub dataset, not downloaded for a dry run")
    import datasets  # heavy; only this hub source needs it

    try:
        rows = datasets.load_dataset(BEAVERTAILS_HUB_ID, split=hub_split)
    except Exception as e:  # offline, auth, missing cache... all mean the same thing to the user
        cause = (str(e).splitlines() or [""])[0][:120]
        raise DataNotFound(
            f"cannot load {BEAVERTAILS_HUB_ID} from the hub (offline?): use source 'beavertails_refusals' "
            f"with data.root, or pre-download it [{type(e).__name__}: {cause}]"
        ) from e
    out = []
    for i, row in enumerate(rows):
        if (response == "safe" and not row["is_safe"]) or (response == "unsafe" and row["is_safe"]):
            continue
        where = f"{BEAVERTAILS_HUB_ID} {hub_split} row {i}"
        prompt = get_str(row, "prompt", where)
        answer = "" if response == PROMPT_ONLY else get_str(row, "response", where)
        out.append(Example(instruction=prompt, output=answer, source=f"beavertails/{hub_split}#{i}"))
    return out


def _load_alpaca_eval(root: Path | None, split: str, response: str, path: Path | None) -> list[Example]:
    file = data_file(root, "alpaca_eval/alpaca_eval_805_example_outputs.json")
    return [
        Example(
            instruction=get_str(item, "instruction", f"{file}, item {i}"), source=f"alpaca_eval/{split}#{i}"
        )
        for i, item in enumerate(read_json_list(file))
    ]


def _alpaca_row(row: dict[str, Any], where: str, response: str, source: str) -> Example:
    """An Example from a row with instruction / input / output fields (output unless prompt-only)."""
    return Example(
        instruction=get_str(row, "instruction", where),
        input=get_str(row, "input", where, required=False),
        output="" if response == PROMPT_ONLY else get_str(row, "output", where),
        source=source,
    )


def _load_safety_tuned_llamas(
    root: Path | None, split: str, response: str, path: Path | None
) -> list[Example]:
    file = data_file(root, "safety_tuned_llamas/safety_only_data_Instructions.json")
    out = []
    for i, item in enumerate(read_json_list(file)):
        out.append(_alpaca_row(item, f"{file}, item {i}", response, f"safety_tuned_llamas/{split}#{i}"))
    return out


def _load_dolly(root: Path | None, split: str, response: str, path: Path | None) -> list[Example]:
    file = data_file(root, DOLLY)
    return [
        _alpaca_row(row, f"{file}, line {lineno}", response, f"dolly/{split}#{i}")
        for i, (lineno, row) in enumerate(read_jsonl(file))
    ]


def _load_lima(root: Path | None, split: str, response: str, path: Path | None) -> list[Example]:
    # Single-turn rows only: 29 dialogues carry earlier turns in `history`, which a one-turn template would drop.
    file = data_file(root, LIMA)
    return [
        _alpaca_row(row, f"{file}, item {i}", response, f"lima/{split}#{i}")
        for i, row in enumerate(read_json_list(file))
        if not row.get("history")
    ]


def _load_jsonl(root: Path | None, split: str, response: str, path: Path | None) -> list[Example]:
    if path is None:
        raise FtguardError(
            "source 'jsonl' needs a file: set its path to a JSONL file with instruction/input/output"
        )
    if not path.is_file():
        raise DataNotFound(f"JSONL file '{path}' not found: fix the path of the 'jsonl' source")
    out = []
    for i, (lineno, row) in enumerate(read_jsonl(path)):
        out.append(_alpaca_row(row, f"{path}, line {lineno}", response, f"jsonl/{split}#{i}"))
    return out


def _load_xstest(root: Path | None, split: str, response: str, path: Path | None) -> list[Example]:
    file = data_file(root, XSTEST_PROMPTS)
    out = []
    reader = csv.DictReader(io.StringIO(read_text(file), newline=""))
    for row in reader:
        where = f"{file}, line {reader.line_num}"
        label = get_str(row, "label", where)
        if label not in ("safe", "unsafe"):
            raise FtguardError(f"{where}: label {label!r} is neither 'safe' nor 'unsafe': fix the file")
        if label == split:
            prompt = get_str(row, "prompt", where)
            out.append(Example(instruction=prompt, source=f"xstest/{split}#{len(out)}"))
    return out


SOURCES: dict[str, _Source] = {
    "beavertails_refusals": _Source(
        splits=("train", "test"),
        responses=("safe", "unsafe", PROMPT_ONLY),
        default_response=PROMPT_ONLY,
        files=lambda split, path: [f"beavertails_refusals/{split}.jsonl"],
        load=_load_beavertails_refusals,
    ),
    "beavertails": _Source(
        splits=tuple(_HUB_SPLITS),
        responses=("safe", "unsafe", PROMPT_ONLY),
        default_response=PROMPT_ONLY,
        files=lambda split, path: [],
        load=_load_beavertails_hub,
        needs_root=False,
    ),
    "alpaca_eval": _Source(
        splits=("eval",),
        responses=(PROMPT_ONLY,),
        default_response=PROMPT_ONLY,
        files=lambda split, path: ["alpaca_eval/alpaca_eval_805_example_outputs.json"],
        load=_load_alpaca_eval,
    ),
    "safety_tuned_llamas": _Source(
        splits=("train",),
        responses=("output", PROMPT_ONLY),
        default_response="output",
        files=lambda split, path: ["safety_tuned_llamas/safety_only_data_Instructions.json"],
        load=_load_safety_tuned_llamas,
    ),
    "xstest": _Source(
        splits=("safe", "unsafe"),
        responses=(PROMPT_ONLY,),
        default_response=PROMPT_ONLY,
        files=lambda split, path: [XSTEST_PROMPTS],
        load=_load_xstest,
    ),
    # Benign instructions with human-written answers: the helpful half of helpful-and-harmless alignment.
    "dolly": _Source(
        splits=("train",),
        responses=("output", PROMPT_ONLY),
        default_response="output",
        files=lambda split, path: [DOLLY],
        load=_load_dolly,
    ),
    "lima": _Source(
        splits=("train",),
        responses=("output", PROMPT_ONLY),
        default_response="output",
        files=lambda split, path: [LIMA],
        load=_load_lima,
    ),
    "jsonl": _Source(
        splits=None,
        responses=("output", PROMPT_ONLY),
        default_response="output",
        files=lambda split, path: [str(path)] if path else [],
        load=_load_jsonl,
        needs_root=False,
    ),
}


_SLICE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<start>\d*):(?P<stop>\d*)(?::(?P<step>\d+))?\]$")


def parse_split(split: str) -> tuple[str, slice | None]:
    """``"test[100:300]"`` → ``("test", slice(100, 300))``; a plain split name has no slice.

    A step draws every k-th row: files ordered by kind (XSTest by prompt type, AlpacaEval by dataset) give a
    validation and a test slice of the same mix with ``[0::2]`` and ``[1::2]``, where ``[:100]`` and ``[100:]``
    would hold different kinds."""
    if "[" not in split:
        return split, None
    match = _SLICE.match(split)
    if match is None:
        raise FtguardError(
            f"split {split!r} must be a name or a name with a row slice, such as 'test[100:300]' or 'test[1::2]'"
        )
    start, stop, step = (int(match[k]) if match[k] else None for k in ("start", "stop", "step"))
    if start is not None and stop is not None and stop <= start:
        raise FtguardError(f"split {split!r} selects no rows: the slice's end must be after its start")
    if step == 0:
        raise FtguardError(f"split {split!r}: a slice's step must be at least 1")
    return match["name"], slice(start, stop, step)


def _lookup(source: str, split: str | None, response: str | None) -> tuple[_Source, str, str]:
    if source not in SOURCES:
        raise unknown_name_error("data source", source, tuple(SOURCES))
    spec = SOURCES[source]
    split = split if split is not None else (spec.splits[0] if spec.splits else "train")
    split, _ = parse_split(split)
    if spec.splits is not None and split not in spec.splits:
        raise FtguardError(f"source {source!r} has no split {split!r}: use one of {', '.join(spec.splits)}")
    response = response if response is not None else spec.default_response
    if response not in spec.responses:
        raise FtguardError(
            f"source {source!r} has no response {response!r}: use one of {', '.join(spec.responses)} (or none)"
        )
    return spec, split, response


_ROWS_CACHE: OrderedDict[tuple, tuple[tuple, list[Example]]] = OrderedDict()
_ROWS_CACHE_SIZE = 32


def cached_rows(key: tuple, files: list[Path], load: Callable[[], list[Example]]) -> list[Example]:
    """``load()``'s rows, parsed once per process while ``files`` keep their size and modification time.

    A sweep builds the data plan of every run before it starts (90 runs read SST-2's 67k rows 180 times); the rows
    are immutable, so each caller gets its own list of the same Examples. Sources without files (the hub) are not
    cached.
    """
    if not files:
        return load()
    state = tuple(
        (str(f), *((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else (None, None))) for f in files
    )
    hit = _ROWS_CACHE.get(key)
    if hit is not None and hit[0] == state:
        _ROWS_CACHE.move_to_end(key)
        return list(hit[1])
    rows = load()
    _ROWS_CACHE[key] = (state, rows)
    if len(_ROWS_CACHE) > _ROWS_CACHE_SIZE:
        _ROWS_CACHE.popitem(last=False)
    return list(rows)


def check_source(source: str, split: str | None, response: str | None) -> None:
    """Fail when ``source`` is not registered or has no such split or response; reads no file."""
    _lookup(source, split, response)


def load_examples(
    source: str,
    *,
    split: str | None = None,
    root: str | Path = DATA_ROOT_BUNDLED,
    response: str | None = None,
    path: str | Path | None = None,
) -> list[Example]:
    """Load one source as Examples (see the module docstring for ``response``).

    ``split=None`` means the source's first split (``train``; ``eval`` for ``alpaca_eval``, ``safe`` for ``xstest``).
    ``path`` is only used by the ``jsonl`` source.
    """
    spec, name, response = _lookup(source, split, response)
    root_path = resolve_root(root) if spec.needs_root else None
    file_path = Path(path).expanduser() if path is not None else None
    files = [Path(f) if root_path is None else root_path / f for f in spec.files(name, file_path)]
    rows = cached_rows(
        ("source", source, name, response, str(root_path), str(file_path)),
        files,
        lambda: spec.load(root_path, name, response, file_path),
    )
    _, rows_slice = parse_split(split) if split is not None else (name, None)
    if rows_slice is None:
        return rows
    if rows_slice.start is not None and rows_slice.start >= len(rows):
        raise FtguardError(f"split {split!r} of {source!r} starts after its last row ({len(rows)} rows)")
    return rows[rows_slice]


def source_files(
    source: str,
    split: str | None = None,
    root: str | Path = DATA_ROOT_BUNDLED,
    path: str | Path | None = None,
) -> list[Path]:
    """The files a source reads (empty for hub sources), so callers can record their hashes."""
    spec, split, _ = _lookup(source, split, None)
    if not spec.needs_root:
        return [Path(p).expanduser() for p in spec.files(split, path)]
    return [resolve_root(root) / rel for rel in spec.files(split, path)]
