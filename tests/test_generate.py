"""Batched generation must give exactly what one-prompt-at-a-time greedy decoding gives."""

from __future__ import annotations

import pytest
import torch

from ftguard.evaluation.generate import generate
from tiny import peaked_llama, word_tokenizer

PROMPTS = [
    "the cat sat",
    "what is the red house on the green tree",
    "dog",
    "how do the blue sky and the slow cat ran fast",
    "why are",
]


def test_batched_equals_one_at_a_time_and_keeps_order():
    tokenizer = word_tokenizer()
    model = peaked_llama(len(tokenizer))
    model.train()

    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    alone = [
        generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in PROMPTS
    ]

    assert batched == alone
    assert sum(bool(text) for text in batched) >= 3  # the comparison is not between empty strings
    assert tokenizer.padding_side == "right"
    assert model.training


def test_order_restored_despite_length_sort():
    tokenizer = word_tokenizer()
    model = peaked_llama(len(tokenizer))
    forward = generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=2, progress=False)
    backward = generate(model, tokenizer, PROMPTS[::-1], max_new_tokens=4, batch_size=2, progress=False)
    assert backward == forward[::-1]


def test_eval_mode_kept_and_empty_list():
    tokenizer = word_tokenizer()
    model = peaked_llama(len(tokenizer))
    model.eval()
    assert generate(model, tokenizer, [], max_new_tokens=4) == []
    generate(model, tokenizer, PROMPTS[:2], max_new_tokens=2, progress=False)
    assert not model.training


def test_tokenizer_without_pad_token_is_restored():
    tokenizer = word_tokenizer()
    model = peaked_llama(len(tokenizer))
    tokenizer.pad_token = None
    out = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=3, batch_size=3, progress=False)
    assert len(out) == 3
    assert tokenizer.pad_token is None


def test_new_tokens_only_and_autocast_runs():
    tokenizer = word_tokenizer()
    model = peaked_llama(len(tokenizer))
    out = generate(
        model, tokenizer, ["the cat sat"], max_new_tokens=3, autocast_dtype=torch.bfloat16, progress=False
    )
    assert len(out[0].split()) <= 3


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"max_new_tokens": 2, "batch_size": 0}])
def test_bad_sizes_raise(bad):
    from ftguard.errors import FtguardError

    tokenizer = word_tokenizer()
    model = peaked_llama(len(tokenizer))
    with pytest.raises(FtguardError):
        generate(model, tokenizer, ["the cat"], **bad)
