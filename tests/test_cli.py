"""CLI surface: every command has --help; methods and configs list what is registered and packaged."""

from __future__ import annotations

import json

import pytest

from ftguard import cli

COMMANDS = ["run", "align", "finetune", "evaluate", "methods", "configs", "compare", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: ftguard" in capsys.readouterr().out


def test_methods_lists_sft_for_both_stages(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    align, finetune = out.split("finetune:")
    assert "sft" in align and "sft" in finetune


def test_configs_lists_packaged_configs(capsys):
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "quickstart-tiny" in out and "demo" in out


def test_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: tiny}\nalign: {train: {batch_size: -1}}\n")
    assert cli.main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ftguard: error: 'align.train.batch_size' must be ≥ 1, got -1"


def test_compare_of_a_non_run_dir_says_so(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path)]) == 2
    assert "results.json not found" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_methods_runs_one_pipeline_per_method_and_compares(tmp_path, capsys):
    small = [
        "model.name=tiny",
        "model.max_length=256",
        "align.train.max_steps=2",
        "finetune.train.max_steps=2",
        "data.finetune.harmful_ratio=0.2",
        "evaluate.judge=keyword",
        "evaluate.extra_judges=[]",  # the demo's extra judges include keyword, now the main one
        "evaluate.refusal_detector=rules",
        "evaluate.harmful_prompts.n=4",
        "evaluate.task_n=4",
        "evaluate.points=[finetune]",
        "evaluate.over_refusal_prompts.n=4",
        "evaluate.over_refusal_max_new_tokens=4",
    ]
    args = ["demo", "--methods", "sft,booster,lisa", "--output-dir", str(tmp_path)] + sum(
        (["--set", s] for s in small), []
    )
    assert cli.main(args) == 0
    assert (tmp_path / "demo-sft" / "results.json").exists() and (tmp_path / "demo-compare.png").exists()
    out = capsys.readouterr().out
    assert (
        "| demo-sft | finetune | sft | 0.2 | keyword |" in out
        and "| demo-booster | finetune | sft | 0.2 | keyword |" in out
    )
    booster = json.loads((tmp_path / "demo-booster" / "results.json").read_text())
    assert (
        booster["config"]["adapter"]["topology"] == "single"
        and booster["config"]["align"]["method"] == "booster"
    )
    # a fine-tuning-stage method replaces the SFT fine-tune and keeps the SFT alignment
    lisa = json.loads((tmp_path / "demo-lisa" / "results.json").read_text())
    assert (lisa["config"]["align"]["method"], lisa["config"]["finetune"]["method"]) == ("sft", "lisa")
    assert "| demo-lisa | finetune | lisa | 0.2 | keyword |" in out
