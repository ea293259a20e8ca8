"""Models: built-in names (``tiny``, ``smollm2-135m``, ``gemma3-270m``), safe loading, and LoRA adapters."""

from ftguard.models.adapters import (
    LoraSpec,
    add_lora,
    check_target_modules,
    count_parameters,
    load_lora,
    merge_lora,
)
from ftguard.models.loading import (
    PRECISION_ENV,
    auto_uses_bf16,
    cache_dir,
    default_device,
    fast_bf16_available,
    forced_precision,
    hardware_label,
    load_model,
    load_tokenizer,
    precision_label,
    resolve_dtype,
    resolve_model,
)

__all__ = [
    "PRECISION_ENV",
    "LoraSpec",
    "auto_uses_bf16",
    "add_lora",
    "cache_dir",
    "check_target_modules",
    "count_parameters",
    "default_device",
    "fast_bf16_available",
    "forced_precision",
    "hardware_label",
    "load_lora",
    "load_model",
    "load_tokenizer",
    "merge_lora",
    "precision_label",
    "resolve_dtype",
    "resolve_model",
]
