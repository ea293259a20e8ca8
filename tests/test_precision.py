"""What `auto` precision resolves to, $FTGUARD_PRECISION forcing it, and the precision a run records."""

from __future__ import annotations

import json

import pytest
import torch

import ftguard.models.loading as loading
from ftguard.errors import FtguardError
from ftguard.models import PRECISION_ENV, auto_uses_bf16, precision_label
from ftguard.pipeline.evaluation import autocast_dtype
from ftguard.training.arguments import mixed_precision_flags


@pytest.fixture(params=[True, False], ids=["native-bf16-cpu", "avx2-only-cpu"])
def cpu_has_bf16(request, monkeypatch):
    monkeypatch.setattr(loading, "fast_bf16_available", lambda: request.param)
    return request.param


def test_auto_follows_the_hardware_unless_forced(cpu_has_bf16, monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert auto_uses_bf16() is cpu_has_bf16
    assert mixed_precision_flags("auto")["bf16"] is cpu_has_bf16
    # Generation: fp32 on every CPU (answers independent of the batch size), bf16 where a GPU has it.
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert (autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16) is cpu_has_bf16

    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert not auto_uses_bf16() and mixed_precision_flags("auto")["bf16"] is False
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) is None

    monkeypatch.setenv(PRECISION_ENV, "BF16 ")
    assert auto_uses_bf16() and mixed_precision_flags("auto")["bf16"] is True
    assert autocast_dtype("auto", torch.device("cpu")) == torch.bfloat16


def test_explicit_settings_win_over_the_forced_precision(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert mixed_precision_flags("no")["bf16"] is False
    assert autocast_dtype("no", torch.device("cpu")) is None
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert mixed_precision_flags("bf16")["bf16"] is True
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_a_bad_forced_precision_fails_naming_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    with pytest.raises(FtguardError, match=r"FTGUARD_PRECISION='fp16' .*auto, fp32, bf16"):
        mixed_precision_flags("auto")


def test_cli_rejects_a_bad_forced_precision_before_any_work(monkeypatch, tmp_path, capsys):
    from ftguard import cli

    monkeypatch.setenv(PRECISION_ENV, "half")
    assert cli.main(["run", "quickstart-tiny", "--output-dir", str(tmp_path / "run")]) != 0
    assert "FTGUARD_PRECISION" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_precision_label():
    assert precision_label(torch.float32, None) == "float32"
    assert precision_label(torch.float32, torch.bfloat16) == "float32 + bfloat16 autocast"


@pytest.mark.slow
@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_a_run_records_the_precision_and_batch_size_it_was_evaluated_and_trained_in(
    tmp_path, monkeypatch, forced
):
    from ftguard import cli

    monkeypatch.setenv(PRECISION_ENV, forced)
    out = tmp_path / "run"
    sets = [f"--set={s}" for s in ("finetune=null", "evaluate.points=[align]", "align.train.max_steps=2")]
    sets.append("--set=evaluate.batch_size=5")
    assert cli.main(["run", "quickstart-tiny", "--output-dir", str(out), *sets]) == 0
    results = json.loads((out / "results.json").read_text())
    expected = "float32" if forced == "fp32" else "float32 + bfloat16 autocast"
    for entry in results["stages"].values():
        assert entry["eval_precision"] == expected and entry["eval_batch_size"] == 5
    assert json.loads((out / "align" / "COMPLETE.json").read_text())["precision"] == expected
