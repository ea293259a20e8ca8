"""Human-labelled answers for checking judges and the refusal detector: one row per (prompt, answer).

The file format of ``ftguard judge validate`` is JSONL, one object per answer::

    {"prompt": str, "response": str, "refusal": true|false|null, "harmful": true|false|null, "source": str}

``null`` means "not labelled for that question": a row can carry a harm label, a refusal label or both.
``source`` names where the answer came from (a model, a dataset); results are split by it, and
leave-one-source-out validation holds out one source at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ftguard.errors import FtguardError

FIELDS = ("prompt", "response", "refusal", "harmful", "source")


@dataclass(frozen=True)
class LabelledAnswer:
    prompt: str
    response: str
    refusal: bool | None
    harmful: bool | None
    source: str


def _check_row(obj: object, where: str) -> LabelledAnswer:
    if not isinstance(obj, dict):
        raise FtguardError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}")
    missing = [f for f in ("prompt", "response", "source") if f not in obj]
    if missing:
        raise FtguardError(
            f"{where}: missing field(s) {', '.join(missing)} (each row needs {', '.join(FIELDS)})"
        )
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise FtguardError(
            f"{where}: unknown field(s) {', '.join(unknown)}: valid fields are {', '.join(FIELDS)}"
        )
    for field in ("prompt", "response", "source"):
        if not isinstance(obj[field], str):
            raise FtguardError(f"{where}: field {field!r} must be a string, got {type(obj[field]).__name__}")
    if not obj["source"].strip():
        raise FtguardError(
            f"{where}: field 'source' is empty: name the model or dataset the answer came from"
        )
    for field in ("refusal", "harmful"):
        value = obj.get(field)
        if value is not None and not isinstance(value, bool):
            raise FtguardError(f"{where}: field {field!r} must be true, false or null, got {value!r}")
    return LabelledAnswer(
        prompt=obj["prompt"],
        response=obj["response"],
        refusal=obj.get("refusal"),
        harmful=obj.get("harmful"),
        source=obj["source"].strip(),
    )


def read_labelled(path: str | Path) -> list[LabelledAnswer]:
    """Rows of a labelled JSONL file; a malformed row is an error naming its line, never skipped."""
    path = Path(path)
    if not path.is_file():
        raise FtguardError(
            f"labelled file {path} does not exist: pass a JSONL file with fields {', '.join(FIELDS)}"
        )
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise FtguardError(f"{where}: not valid JSON ({err.msg})") from err
            rows.append(_check_row(obj, where))
    if not rows:
        raise FtguardError(f"{path} has no rows: pass a JSONL file with fields {', '.join(FIELDS)}")
    if all(r.harmful is None and r.refusal is None for r in rows):
        raise FtguardError(f"{path}: no row has a 'harmful' or 'refusal' label: nothing to validate")
    return rows


def write_labelled(path: str | Path, rows: Iterable[LabelledAnswer]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
            n += 1
    return n


_SPACE = re.compile(r"\s+")


def prompt_key(prompt: str) -> str:
    """Prompts compared case- and whitespace-insensitively, so a re-spaced copy counts as the same prompt."""
    return _SPACE.sub(" ", prompt).strip().lower()


def leave_one_source_out(rows: list[LabelledAnswer], held_out: str) -> tuple[list[int], list[int]]:
    """(fit, test) row indices: test is the held-out source; fit is every other source minus rows sharing a test prompt.

    Several sources answer the same prompts (three models on XSTest, BeaverTails prompts in more than one
    dataset): without the prompt filter a held-out score would partly measure memory of the prompt.
    """
    test = [i for i, r in enumerate(rows) if r.source == held_out]
    if not test:
        known = ", ".join(sorted({r.source for r in rows}))
        raise FtguardError(f"no row has source {held_out!r}: sources are {known}")
    test_prompts = {prompt_key(rows[i].prompt) for i in test}
    fit = [i for i, r in enumerate(rows) if r.source != held_out and prompt_key(r.prompt) not in test_prompts]
    return fit, test
