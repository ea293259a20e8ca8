"""The tests' tiny random Llama, built in code (nothing is loaded from the hub): one shape shared by every test,
small enough that a training step takes milliseconds on a CPU. A test passes only what it needs to differ."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

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


def tiny_llama(**overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(tiny_llama_config(**overrides))
