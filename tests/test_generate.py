"""Batched generation must give exactly what one-prompt-at-a-time greedy decoding gives."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ftguard.evaluation.generate import generate

WORDS = "the a cat dog sat on mat ran fast slow red blue green house tree sky what how why is are do".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    # Larger weights give peaked logits, so greedy choices are far from ties and padding noise cannot flip them.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


PROMPTS = [
    "the cat sat",
    "what is the red house on the green tree",
    "dog",
    "how do the blue sky and the slow cat ran fast",
    "why are",
]


def test_batched_equals_one_at_a_time_and_keeps_order():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
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
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    forward = generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=2, progress=False)
    backward = generate(model, tokenizer, PROMPTS[::-1], max_new_tokens=4, batch_size=2, progress=False)
    assert backward == forward[::-1]


def test_eval_mode_kept_and_empty_list():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    model.eval()
    assert generate(model, tokenizer, [], max_new_tokens=4) == []
    generate(model, tokenizer, PROMPTS[:2], max_new_tokens=2, progress=False)
    assert not model.training


def test_tokenizer_without_pad_token_is_restored():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    tokenizer.pad_token = None
    out = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=3, batch_size=3, progress=False)
    assert len(out) == 3
    assert tokenizer.pad_token is None


def test_new_tokens_only_and_autocast_runs():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    out = generate(
        model, tokenizer, ["the cat sat"], max_new_tokens=3, autocast_dtype=torch.bfloat16, progress=False
    )
    assert len(out[0].split()) <= 3


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"max_new_tokens": 2, "batch_size": 0}])
def test_bad_sizes_raise(bad):
    from ftguard.errors import FtguardError

    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    with pytest.raises(FtguardError):
        generate(model, tokenizer, ["the cat"], **bad)
