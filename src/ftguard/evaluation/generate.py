"""Batched greedy generation, the one decoding routine behind HS, FA and the Llama Guard judge."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from ftguard import distributed
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


def count_new_tokens(new_tokens: torch.Tensor, eos_ids: list[int]) -> list[int]:
    """Decoding steps each row of ``new_tokens`` (batch × steps, prompt removed) really took.

    A row ends at its first EOS (any of ``eos_ids``), which counts (the model computed it); what follows is filler that
    ``model.generate`` writes while the rest of the batch goes on. Counting non-pad tokens instead would be
    wrong twice over: SmolLM2 pads with its EOS, and a model may emit the pad id as an ordinary token.
    """
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, dtype=new_tokens.dtype, device=new_tokens.device))
    ended = is_eos.any(dim=1)
    first = is_eos.int().argmax(dim=1)
    full = torch.full_like(first, new_tokens.shape[1])
    return torch.where(ended, first + 1, full).tolist()


def _longest_first(tokenizer, prompts: list[str], add_special_tokens: bool) -> list[int]:
    """Indices of ``prompts`` by decreasing token length, ties in prompt order (the batching order)."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    return sorted(range(len(prompts)), key=lambda i: -lengths[i])


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
    token_counts: list[int] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (new text only, stripped), in the order of ``prompts``.

    Prompts are sorted longest first so that each batch holds similar lengths (little padding), and left-padded.
    ``add_special_tokens=False`` is for prompts that already carry BOS (chat templates).
    ``token_counts``, if given, is filled with the number of new tokens each prompt got (see
    :func:`count_new_tokens`), in the order of ``prompts``.
    """
    if token_counts is not None:
        token_counts[:] = [0] * len(prompts)
    if not prompts:
        return []
    if max_new_tokens < 1 or batch_size < 1:
        raise FtguardError(
            f"generation needs max_new_tokens >= 1 and batch_size >= 1 (got {max_new_tokens}, {batch_size})"
        )
    order = _longest_first(tokenizer, prompts, add_special_tokens)
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
                    if token_counts is not None:
                        steps = count_new_tokens(new_tokens, config.eos_token_id)
                        for i, n in zip(batch, steps, strict=True):
                            token_counts[i] = n
                    bar.update(len(batch))
    finally:
        model.train(was_training)
    return outputs


def generate_sharded(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    add_special_tokens: bool = True,
    progress: bool = True,
    token_counts: list[int] | None = None,
    **kwargs,
) -> list[str]:
    """:func:`generate` split over the ranks of a multi-process launch: each rank decodes its share, and every rank
    gets all the answers back in the order of ``prompts`` (plain :func:`generate` in a single process).

    Must be called by every rank, with the same prompts. The shares are whole batches of the single-process
    order (longest first, ``batch_size`` prompts each) dealt round robin: every prompt is decoded in the very
    batch, with the same padding, as by one process, and the long batches spread over the ranks.
    """
    world = distributed.world_size()
    if world <= 1 or not prompts:
        return generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            add_special_tokens=add_special_tokens,
            progress=progress,
            token_counts=token_counts,
            **kwargs,
        )
    order = _longest_first(tokenizer, prompts, add_special_tokens)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # In decreasing length, so that generate's own sort keeps these batches as they are.
    mine = [i for batch in batches[distributed.rank() :: world] for i in batch]
    counts: list[int] | None = [] if token_counts is not None else None
    texts = generate(
        model,
        tokenizer,
        [prompts[i] for i in mine],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        add_special_tokens=add_special_tokens,
        progress=progress and distributed.is_main(),
        token_counts=counts,
        **kwargs,
    )
    outputs: list[str] = [""] * len(prompts)
    if token_counts is not None:
        token_counts[:] = [0] * len(prompts)
    for indices, answers, steps in distributed.gather((mine, texts, counts)):
        for j, i in enumerate(indices):
            outputs[i] = answers[j]
            if token_counts is not None:
                token_counts[i] = steps[j]
    return outputs
