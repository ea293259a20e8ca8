"""A customer's upload, read as it is: OpenAI-style chat JSONL or Alpaca-style JSONL (docs/provider.md).

Chat rows are ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``: an optional
system message, then user and assistant turns in alternation, ending with an assistant turn. Every assistant turn
is trained on (the loss is on assistant tokens only, rendered with the model's own chat template); a row of one
user and one assistant turn is an ordinary instruction row and trains under any prompt template. Alpaca rows are
``{"instruction", "input" (optional), "output"}``. Nothing is mixed in: the upload is the fine-tune's data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftguard.data.example import Example
from ftguard.data.sources import read_jsonl
from ftguard.errors import FtguardError

FORMATS = ("auto", "chat", "alpaca")
ROLES = ("system", "user", "assistant")


def read_upload(path: str | Path, fmt: str = "auto") -> tuple[list[Example], dict[str, Any]]:
    """The rows of ``path`` as Examples, and a report of what was read (rows, turns, characters)."""
    path = Path(path)
    if not path.is_file():
        raise FtguardError(f"upload file '{path}' does not exist: give the customer's JSONL file's path")
    if fmt not in FORMATS:
        raise FtguardError(f"upload format {fmt!r} is not one of {', '.join(FORMATS)}")
    examples: list[Example] = []
    seen: set[str] = set()
    counts = {
        "chat": 0,
        "alpaca": 0,
        "multi_turn": 0,
        "with_system": 0,
        "assistant_turns": 0,
        "characters": 0,
    }
    for lineno, row in read_jsonl(path):
        where = f"{path}, line {lineno}"
        kind = fmt if fmt != "auto" else ("chat" if "messages" in row else "alpaca")
        seen.add(kind)
        ex = _chat_row(row, where) if kind == "chat" else _alpaca_row(row, where)
        ex = Example(ex.instruction, ex.output, ex.input, f"{path.name}#{lineno}", ex.messages)
        counts[kind] += 1
        turns = [m for m in ex.messages] or [("user", ex.instruction), ("assistant", ex.output)]
        counts["assistant_turns"] += sum(role == "assistant" for role, _ in turns)
        counts["multi_turn"] += sum(role == "assistant" for role, _ in turns) > 1
        counts["with_system"] += any(role == "system" for role, _ in turns)
        counts["characters"] += sum(len(text) for _, text in turns) + len(ex.input)
        examples.append(ex)
    if len(seen) > 1:
        raise FtguardError(f"{path} mixes chat rows (messages) and Alpaca rows: one format per file")
    return examples, {"path": str(path), "rows": len(examples), **counts}


def _chat_row(row: dict[str, Any], where: str) -> Example:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FtguardError(
            f"{where}: a chat row needs 'messages', a non-empty list of {{role, content}} objects"
        )
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise FtguardError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise FtguardError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise FtguardError(f"{where}: messages[{i}].content must be a non-empty string")
        turns.append((role, content))
    body = turns[1:] if turns[0][0] == "system" else turns
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or [role for role, _ in body] != expected[: len(body)] or body[-1][0] != "assistant":
        shown = ", ".join(role for role, _ in turns)
        raise FtguardError(
            f"{where}: messages must be an optional system message, then user and assistant turns in "
            f"alternation ending with an assistant turn; got {shown}"
        )
    if len(turns) == 2:  # one exchange, no system message: an instruction row like any other
        return Example(turns[0][1], turns[1][1])
    return Example(body[-2][1], body[-1][1], messages=tuple(turns))


def _alpaca_row(row: dict[str, Any], where: str) -> Example:
    values = {}
    for key in ("instruction", "input", "output"):
        value = row.get(key, "")
        if not isinstance(value, str):
            raise FtguardError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
        values[key] = value
    for key in ("instruction", "output"):
        if not values[key].strip():
            raise FtguardError(f"{where}: an Alpaca row needs a non-empty '{key}'")
    return Example(values["instruction"], values["output"], values["input"])
