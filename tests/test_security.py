"""Security: hub tokens never reach outputs or logs; outputs hold no pickles; no unsafe loading in the code."""

from __future__ import annotations

import logging
import re
import secrets
from pathlib import Path

import pytest

from ftguard import cli

SRC = Path(__file__).resolve().parents[1] / "src" / "ftguard"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# Made up per run (never a real credential in the repository); shaped like a hub token.
TOKEN = "hf_" + secrets.token_hex(17)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.mark.slow
def test_a_run_never_writes_or_logs_the_hub_token(tmp_path, monkeypatch, capsys, caplog):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN"):
        monkeypatch.setenv(name, TOKEN)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    overrides = ["align.train.max_steps=2", "finetune.train.max_steps=2", "evaluate.harmful_prompts.n=4"]
    args = ["-v", "run", "quickstart-tiny", "--output-dir", str(out)]
    for item in overrides:
        args += ["--set", item]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    seen = [captured.out, captured.err, caplog.text]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files, "the run wrote nothing"
    leaks = [str(p) for p in files if TOKEN.encode() in p.read_bytes()]
    assert leaks == [] and not any(TOKEN in text for text in seen)
    # every weight file is safetensors: nothing a loader would have to unpickle
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]


def _sources() -> list[Path]:
    return [*SRC.rglob("*.py"), *SCRIPTS.rglob("*.py")]


def test_no_torch_load_without_weights_only_in_the_code():
    offenders = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start() : text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
    assert offenders == []


def test_remote_code_is_never_switched_on_in_the_code():
    # trust_remote_code comes only from the user's config (model.trust_remote_code, default false) or a judge
    # option the user sets; no call site may hard-code it on.
    offenders = [
        str(path)
        for path in _sources()
        if re.search(r"trust_remote_code\s*=\s*True", path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_trust_remote_code_defaults_off_in_every_packaged_config():
    from ftguard.config import load_config, packaged_configs

    for name in packaged_configs():
        assert load_config(name).model.trust_remote_code is False, name
