"""The built-in ``tiny`` model: a random 2-layer Llama with a BPE tokenizer trained on the bundled data.

It exists so that the whole pipeline can run on a laptop CPU in seconds; its outputs mean nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

# The package data that the tokenizer is trained on; a module attribute so tests can point it elsewhere.
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data" / "bundled"
CORPUS_SUFFIXES = (".jsonl", ".tsv", ".csv", ".json")
# Bounds the build time whatever the bundled data grows to.
MAX_CORPUS_CHARS = 4_000_000

EOT, USER, ASSISTANT = "<|endoftext|>", "<|user|>", "<|assistant|>"
VOCAB_SIZE = 1024
MAX_LENGTH = 512
MODEL_KWARGS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_LENGTH,
    "tie_word_embeddings": False,
}
# Bump when the build recipe changes in a way the other hash inputs do not capture.
RECIPE_VERSION = 1

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|endoftext|>\\n' }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

FALLBACK_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n### Instruction:\nSummarise the review in one word.\n### Response:\npositive\n"
    "I'm sorry, but I cannot help with that request because it could cause harm to people. "
    "The film was a delight from start to finish, with a clever plot and warm, funny performances. "
    "Here is a short answer: water boils at one hundred degrees Celsius at sea level.\n"
)


def corpus_files() -> list[Path]:
    """The bundled data files the tokenizer is trained on, in a fixed order."""
    if not BUNDLED_DIR.is_dir():
        return []
    files = [p for p in BUNDLED_DIR.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(BUNDLED_DIR).as_posix())


def fingerprint(files: list[Path]) -> str:
    """Short hash of everything the build depends on, so a data or recipe change gets a new folder."""
    h = hashlib.sha256()
    recipe = {"v": RECIPE_VERSION, "vocab": VOCAB_SIZE, "model": MODEL_KWARGS, "chat": CHAT_TEMPLATE}
    h.update(json.dumps(recipe, sort_keys=True).encode())
    if not files:
        h.update(FALLBACK_TEXT.encode())
    for path in files:
        data = path.read_bytes()
        h.update(f"\0{path.relative_to(BUNDLED_DIR).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:10]


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _file_texts(path: Path) -> Iterator[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    # JSON keys and escapes would waste merges on syntax, so train on the string values instead.
    try:
        if path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    yield from _strings(json.loads(line))
            return
        if path.suffix == ".json":
            yield from _strings(json.loads(text))
            return
    except json.JSONDecodeError:
        pass
    yield from text.splitlines()


def corpus_texts(files: list[Path]) -> list[str]:
    """The training texts, capped at :data:`MAX_CORPUS_CHARS`."""
    texts, total = [], 0
    for path in files:
        for text in _file_texts(path):
            if total >= MAX_CORPUS_CHARS:
                return texts
            texts.append(text)
            total += len(text)
    return texts or FALLBACK_TEXT.splitlines()


def build_tokenizer(texts: list[str]):
    """Train the byte-level BPE tokenizer and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        extra_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def build(out: Path, files: list[Path]) -> None:
    """Write the tokenizer and a seeded random ``LlamaForCausalLM`` into ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(corpus_texts(files))
    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(
        **MODEL_KWARGS, vocab_size=len(tokenizer), bos_token_id=eot, eos_token_id=eot, pad_token_id=eot
    )
    # fork_rng keeps the caller's random state untouched by the fixed seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
