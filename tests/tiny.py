"""The tests' tiny random Llama, built in code (nothing is loaded from the hub): one shape shared by every test,
small enough that a training step takes milliseconds on a CPU. A test passes only what it needs to differ.

Also what unit tests build around it: a LoRA on it, a word-level tokenizer, the collator, TrainingArguments and
a trainer. Everything is seeded, so two tests that build the same thing start from the same weights."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments

SHAPE = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,  # grouped-query attention, as in SmolLM2 and Llama-3
    "max_position_embeddings": 64,
}


def tiny_llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**SHAPE, **overrides})


def tiny_llama(*, seed: int | None = 0, **overrides) -> LlamaForCausalLM:
    """Seeds torch's global generator first (unless ``seed`` is None): the weights depend only on the arguments."""
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides))


def tiny_peft_llama(
    targets: Iterable[str] = ("q_proj", "v_proj", "up_proj"),
    *,
    fresh: bool = True,
    dropout: float = 0.0,
    seed: int = 0,
    **overrides,
) -> PeftModel:
    """The tiny Llama under a rank-4 LoRA (alpha 8). ``fresh``: PEFT's lora_B = 0, a new adapter that leaves the
    outputs unchanged; otherwise PEFT's random B, as an adapter that has been trained."""
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=fresh, target_modules=list(targets)
    )
    return get_peft_model(tiny_llama(seed=seed, **overrides), config)


def tiny_lora_llama() -> PeftModel:
    """A LoRA on q/v with lora_B ~ N(0, 0.3): with PEFT's zero B every lora_A gradient would be zero, and a
    method's gradient would be checked on half the tensors only."""
    model = tiny_peft_llama(("q_proj", "v_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return model


def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Rows of one length, stacked as they are (no padding to hide a bug behind)."""
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def training_args(output_dir: str | Path, **overrides) -> TrainingArguments:
    """CPU, no reporting, no checkpoints unless a test asks for them; every other field is the test's own."""
    defaults = {"use_cpu": True, "report_to": "none", "save_strategy": "no"}
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **overrides})


def tiny_trainer(
    cls,
    output_dir: str | Path,
    model: torch.nn.Module,
    rows: list[dict],
    *,
    collator=collate,
    method_config=None,
    aux: dict[str, list[dict]] | None = None,
    **args,
):
    """A trainer of class ``cls`` (FtguardTrainer or a method's) on ``rows``, with its extra streams ``aux``
    (name → rows); ``args`` go to :func:`training_args`."""
    return cls(
        model=model,
        args=training_args(output_dir, **args),
        train_dataset=Dataset.from_list(rows),
        data_collator=collator,
        method_config=method_config,
        aux_datasets={name: Dataset.from_list(stream) for name, stream in (aux or {}).items()},
    )


# ----------------------------------------------------------------------- generation and judges

WORDS = "the a cat dog sat on mat ran fast slow red blue green house tree sky what how why is are do".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3: pad, bos, eos, unk


def word_tokenizer(
    words: list[str] = WORDS, *, with_pad: bool = True, add_bos: bool = False
) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word of ``words``; ``add_bos`` prepends <s> to every encoding."""
    vocab = {token: i for i, token in enumerate(SPECIALS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if with_pad else None,
    )


def saved_tiny_llama(path: str | Path, *, seed: int = 3) -> str:
    """A tiny Llama and the word tokenizer saved as a model folder (what an attack that reads the aligned model
    loads from disk)."""
    tiny_llama(seed=seed).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def peaked_llama(vocab_size: int) -> LlamaForCausalLM:
    """A wider tiny Llama for generation tests, its output layer scaled up: peaked logits keep greedy choices far
    from ties, so that padding noise cannot flip them."""
    model = tiny_llama(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model
