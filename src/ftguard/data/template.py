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
        if tokenizer is None:
            raise FtguardError("prompt style 'chat' needs a tokenizer: pass tokenizer= or use style 'alpaca'")
        if not getattr(tokenizer, "chat_template", None):
            raise FtguardError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat "
                "template: set the prompt style to 'alpaca' or use an instruct model's tokenizer"
            )
        content = ex.instruction + (f"\n\n{ex.input}" if ex.input else "")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise FtguardError(f"unknown prompt style {style!r}: use one of {', '.join(STYLES)}")


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
    prompts = [
        format_prompt(ex, style=style, tokenizer=tokenizer, response_newline=response_newline)
        for ex in examples
    ]
    # One batched call per side is much faster than per-example calls on fast tokenizers.
    prompt_ids = tokenizer(prompts, add_special_tokens=(style != "chat"))["input_ids"]
    eos = _eos_id(tokenizer)
    output_ids = tokenizer([ex.output for ex in examples], add_special_tokens=False)["input_ids"]
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    truncated = dropped = 0
    for p_ids, o_ids in zip(prompt_ids, output_ids, strict=True):
        row = _assemble(p_ids, list(o_ids) + [eos], max_length)
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
            len(examples),
            max_length,
            dropped,
        )
    if not columns["input_ids"]:
        raise FtguardError(
            f"every example lost its whole response to truncation at max_length={max_length}: raise model.max_length"
        )
    import datasets  # heavy; keep `import ftguard.data` light

    return datasets.Dataset.from_dict(columns), stats
