"""Prompt templates and response-only tokenization (docs/methods.md, Prompt template).

The same prompt text is used for training, harmful-score generation and task evaluation, so every
caller must go through :func:`format_prompt`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ftguard.data.example import Example
from ftguard.errors import FtguardError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
STYLES = ("alpaca", "chat")

ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def format_prompt(
    ex: Example, *, style: str = "alpaca", tokenizer: Any = None, response_newline: bool = False
) -> str:
    """The prompt text the model sees before its response.

    ``response_newline=True`` is Booster's variant ("### Response:\\n"); Vaccine and Lisa end the prompt
    right after "### Response:". It only applies to the Alpaca style.
    """
    if ex.messages:
        _check_chat(style, tokenizer)
        return tokenizer.apply_chat_template(
            _dicts(ex.messages[:-1]), tokenize=False, add_generation_prompt=True
        )
    if style == "alpaca":
        if ex.input:
            prompt = (
                f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n{ex.instruction}"
                f"\n\n### Input:\n{ex.input}\n\n### Response:"
            )
        else:
            prompt = f"{ALPACA_PREAMBLE_NO_INPUT}\n\n### Instruction:\n{ex.instruction}\n\n### Response:"
        return prompt + "\n" if response_newline else prompt
    if style == "chat":
        _check_chat(style, tokenizer)
        content = ex.instruction + (f"\n\n{ex.input}" if ex.input else "")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise FtguardError(f"unknown prompt style {style!r}: use one of {', '.join(STYLES)}")


def _check_chat(style: str, tokenizer: Any) -> None:
    if style != "chat":
        raise FtguardError(
            "a multi-turn or system-prompt chat row needs the model's chat template: set model.template: chat"
        )
    if tokenizer is None:
        raise FtguardError("prompt style 'chat' needs a tokenizer: pass tokenizer= or use style 'alpaca'")
    if not getattr(tokenizer, "chat_template", None):
        raise FtguardError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat "
            "template: set the prompt style to 'alpaca' or use an instruct model's tokenizer"
        )


def _dicts(turns: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def _chat_turns(ex: Example, tokenizer: Any, max_length: int) -> dict:
    """A multi-turn row with labels on every assistant turn: the text of assistant turn i is what the template
    adds between the conversation up to i with the generation prompt and the conversation through i (its content
    and end-of-turn marker); everything else (system, user turns, role headers) is masked. Each piece is
    tokenized on its own, as prompt and response are for single-turn rows, so no BPE merge crosses a boundary."""
    full = tokenizer.apply_chat_template(_dicts(ex.messages), tokenize=False)
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for i, (role, _) in enumerate(ex.messages):
        if role != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            _dicts(ex.messages[:i]), tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(_dicts(ex.messages[: i + 1]), tokenize=False)
        if not (through.startswith(before) and full.startswith(through) and len(before) >= cursor):
            raise FtguardError(
                f"{ex.source or 'a chat row'}: the model's chat template renders earlier turns differently once "
                "later ones follow, so assistant turns cannot be masked exactly: use a template that renders each "
                "turn the same whatever follows"
            )
        pieces += [(full[cursor : len(before)], False), (through[len(before) :], True)]
        cursor = len(through)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    n = len(input_ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "truncated": n > max_length,
        "no_response": all(label == IGNORE_INDEX for label in labels),
    }


def _response_ids(output: str, tokenizer: Any) -> list[int]:
    # Target text = output + EOS with nothing in between, as in Vaccine/Lisa/Booster
    # (`f"{output}{eos_token}"` appended straight after "### Response:"). No leading space is added:
    # on byte-level BPE (GPT-2/SmolLM style) "Response:" + "negative" splits at ':' anyway, so tokenizing
    # the two parts separately gives exactly the ids of the joint string, and " negative" would train a
    # different first token than the papers did. (SentencePiece/Metaspace tokenizers prepend '▁' to the
    # separately tokenized output; that is the price of an exact prompt/response mask.)
    # For chat templates the EOS id ends the turn; instruct tokenizers set eos to their end-of-turn token.
    ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    return list(ids) + [_eos_id(tokenizer)]


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise FtguardError(
            "the tokenizer has no eos_token: set tokenizer.eos_token before tokenizing training data"
        )
    return int(eos)


def _assemble(prompt_ids: list[int], response_ids: list[int], max_length: int) -> dict:
    # Tokenizing prompt and response separately makes the mask exact: no BPE merge crosses the boundary.
    input_ids = (list(prompt_ids) + list(response_ids))[:max_length]
    n_prompt = min(len(prompt_ids), len(input_ids))
    labels = [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "truncated": len(prompt_ids) + len(response_ids) > max_length,
        "no_response": len(input_ids) <= n_prompt,
    }


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise FtguardError(f"max_length must be an integer >= 2, got {max_length!r}: fix model.max_length")


def tokenize_example(
    ex: Example, tokenizer: Any, *, max_length: int, style: str = "alpaca", response_newline: bool = False
) -> dict:
    """Token ids with labels on the response only.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt tokens), ``truncated`` (the
    full sequence was longer than ``max_length`` and was cut on the right) and ``no_response`` (not a
    single response token survived the cut: the example teaches nothing and callers should drop it).
    """
    _check_max_length(max_length)
    if ex.messages:
        _check_chat(style, tokenizer)
        return _chat_turns(ex, tokenizer, max_length)
    prompt = format_prompt(ex, style=style, tokenizer=tokenizer, response_newline=response_newline)
    # Chat templates already contain BOS and role markers; adding special tokens would duplicate them.
    prompt_ids = tokenizer(prompt, add_special_tokens=(style != "chat"))["input_ids"]
    return _assemble(prompt_ids, _response_ids(ex.output, tokenizer), max_length)


def tokenize_dataset(
    examples: list[Example],
    tokenizer: Any,
    *,
    max_length: int,
    style: str = "alpaca",
    response_newline: bool = False,
) -> tuple[datasets.Dataset, dict]:
    """Tokenize a list of examples into a ``datasets.Dataset`` (input_ids, attention_mask, labels).

    Examples with no response token left after truncation are dropped. The stats dict has ``n`` (rows
    kept), ``truncated`` (rows cut, including dropped ones) and ``dropped_no_response``.
    """
    if not examples:
        raise FtguardError("no examples to tokenize: the data source or mix is empty; check the data config")
    _check_max_length(max_length)
    if any(ex.messages for ex in examples):
        # multi-turn rows are masked turn by turn; the batched path below is for instruction rows
        rows = [
            tokenize_example(
                ex, tokenizer, max_length=max_length, style=style, response_newline=response_newline
            )
            for ex in examples
        ]
        return _to_dataset(rows, len(examples), max_length)
    prompts = [
        format_prompt(ex, style=style, tokenizer=tokenizer, response_newline=response_newline)
        for ex in examples
    ]
    # One batched call per side is much faster than per-example calls on fast tokenizers.
    prompt_ids = tokenizer(prompts, add_special_tokens=(style != "chat"))["input_ids"]
    eos = _eos_id(tokenizer)
    output_ids = tokenizer([ex.output for ex in examples], add_special_tokens=False)["input_ids"]
    rows = [
        _assemble(p_ids, list(o_ids) + [eos], max_length)
        for p_ids, o_ids in zip(prompt_ids, output_ids, strict=True)
    ]
    return _to_dataset(rows, len(examples), max_length)


def _to_dataset(rows: list[dict], n_examples: int, max_length: int) -> tuple[datasets.Dataset, dict]:
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    truncated = dropped = 0
    for row in rows:
        truncated += row["truncated"]
        if row["no_response"]:
            dropped += 1
            continue
        for key in columns:
            columns[key].append(row[key])
    stats = {"n": len(columns["input_ids"]), "truncated": truncated, "dropped_no_response": dropped}
    if truncated:
        log.warning(
            "%d of %d examples were longer than max_length=%d and were truncated (%d dropped: no response "
            "token left); raise model.max_length to keep them whole",
            truncated,
            n_examples,
            max_length,
            dropped,
        )
    if not columns["input_ids"]:
        raise FtguardError(
            f"every example lost its whole response to truncation at max_length={max_length}: raise model.max_length"
        )
    import datasets  # heavy; keep `import ftguard.data` light

    return datasets.Dataset.from_dict(columns), stats
