"""Batched greedy generation, the one decoding routine behind HS, FA and the Llama Guard judge."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from ftguard.errors import FtguardError


@contextlib.contextmanager
def _padding_setup(tokenizer) -> Iterator[int]:
    """Left padding with a pad token for the duration of the block; yields the pad id.

    Decoder-only models must see the prompt end right before the first new token, hence left padding.
    Tokenizers without a pad token (Llama 3) pad with EOS, which the attention mask hides.
    """
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:
        if tokenizer.eos_token is None:
            raise FtguardError(
                "the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token first"
            )
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer.pad_token_id
    finally:
        tokenizer.padding_side = side
        if pad_token is None:
            tokenizer.pad_token = None


def _eos_ids(model, tokenizer) -> list[int]:
    # Chat models stop on more than the tokenizer's EOS (Llama 3: <|eot_id|>); keep the model's list.
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _greedy_config(model, tokenizer, max_new_tokens: int, pad_id: int):
    from transformers import GenerationConfig

    # Sampling knobs from the checkpoint's generation_config (temperature 0.6, top_p 0.9 ...) would be merged
    # in and make transformers warn on every call; pinning them to their neutral values keeps greedy quiet.
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=_eos_ids(model, tokenizer),
    )


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    add_special_tokens: bool = True,
    desc: str = "generating",
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (new text only, stripped), in the order of ``prompts``.

    Prompts are sorted longest first so that each batch holds similar lengths (little padding), and left-padded.
    ``add_special_tokens=False`` is for prompts that already carry BOS (chat templates).
    """
    if not prompts:
        return []
    if max_new_tokens < 1 or batch_size < 1:
        raise FtguardError(
            f"generation needs max_new_tokens >= 1 and batch_size >= 1 (got {max_new_tokens}, {batch_size})"
        )
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(device_type=model.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with _padding_setup(tokenizer) as pad_id, torch.inference_mode(), autocast:
            config = _greedy_config(model, tokenizer, max_new_tokens, pad_id)
            with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
                for start in range(0, len(order), batch_size):
                    batch = order[start : start + batch_size]
                    encoded = tokenizer(
                        [prompts[i] for i in batch],
                        return_tensors="pt",
                        padding=True,
                        add_special_tokens=add_special_tokens,
                    ).to(model.device)
                    generated = model.generate(
                        input_ids=encoded["input_ids"],
                        attention_mask=encoded["attention_mask"],
                        generation_config=config,
                    )
                    new_tokens = generated[:, encoded["input_ids"].shape[1] :]
                    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                    for i, text in zip(batch, texts, strict=True):
                        outputs[i] = text.strip()
                    bar.update(len(batch))
    finally:
        model.train(was_training)
    return outputs
