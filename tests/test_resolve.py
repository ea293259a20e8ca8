"""Resolving a run at the edge (ftguard.resolve): every name checked before any work, `base:` chains for run
configs, and the loading path free of the training stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftguard import cli
from ftguard.config import load_config
from ftguard.methods.lisa import Lisa
from ftguard.resolve import load_run
from ftguard.schema import ConfigError

CONFIG = "quickstart-tiny"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["evaluate.judge=minlm"], r"evaluate\.judge: unknown judge 'minlm'; did you mean 'minilm'"),
        (
            ["evaluate.judge_options={threshold: 0.5, colour: red}"],
            r"evaluate\.judge: judge 'keyword' has no",
        ),
        (["evaluate.extra_judges=[minilm, llama-gaurd]"], r"evaluate\.extra_judges\[1\]: unknown judge"),
        (["data.finetune.task=sst3"], r"data\.finetune\.task: unknown task 'sst3'"),
        (["data.alignment.source=beavertail"], r"data\.alignment: unknown data source 'beavertail'"),
        (
            ["evaluate.harmful_prompts.split=dev"],
            r"evaluate\.harmful_prompts: source 'beavertails_refusals' has no split",
        ),
        # a source inside a method's args, found by walking its config
        (
            ["finetune.method=lisa", "finetune.args={alignment_data: {source: xstest, split: dev}}"],
            r"finetune\.args\.alignment_data: source 'xstest' has no split 'dev'",
        ),
        # and inside the args of the method a filter wraps
        (
            [
                "finetune.method=filter",
                "finetune.args={judge: keyword, then: lisa, then_args: {alignment_data: {source: nope}}}",
            ],
            r"finetune\.args\.then_args\.alignment_data: unknown data source 'nope'",
        ),
        (
            ["align.method=vacine"],
            r"'align\.method': unknown method 'vacine' for stage 'align'; did you mean 'vaccine'",
        ),
        (["align.args={rho: 1}"], r"align\.args"),
    ],
)
def test_every_name_is_checked_when_the_run_is_resolved(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run(CONFIG, overrides)


def test_a_misspelt_judge_fails_the_sweep_dry_run(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    spec = {"name": "s", "base": CONFIG, "set": {"evaluate.judge": "minlm"}, "defenses": {"sft": {}}}
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(["sweep", str(path), "--dry-run"]) != 0
    assert "evaluate.judge: unknown judge 'minlm'" in capsys.readouterr().err


def test_one_method_instance_per_stage_with_its_parsed_args():
    resolved = load_run(CONFIG, ["finetune.method=lisa", "finetune.args={rho: 0.5}", "post.method=recovery"])
    assert resolved.stages == ("align", "finetune", "post")
    lisa = resolved.method("finetune")
    assert isinstance(lisa, Lisa) and lisa.config.rho == 0.5
    assert resolved.data_roles >= {"alignment", "alignment_harmful", "task_validation"}


# ------------------------------------------------------------------------------------------------ base:


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_run_config_is_a_delta_over_its_base(tmp_path):
    parent = _write(
        tmp_path / "parent.yaml", {"base": CONFIG, "name": "parent", "finetune": {"train": {"max_steps": 3}}}
    )
    child = _write(
        tmp_path / "child.yaml",
        {"base": "parent", "name": "child", "finetune": {"method": "lisa", "args": {"rho": 2.0}}},
    )
    cfg = load_config(str(child))
    reference = load_config(CONFIG)
    assert cfg.name == "child"
    assert cfg.finetune.method == "lisa" and cfg.finetune.args == {"rho": 2.0}
    assert cfg.finetune.train.max_steps == 3  # from the middle of the chain
    assert (
        cfg.finetune.train.learning_rate == reference.finetune.train.learning_rate
    )  # from the packaged root
    assert cfg.model == reference.model
    # overrides apply last
    assert load_config(str(child), ["finetune.train.max_steps=9"]).finetune.train.max_steps == 9
    assert parent.exists()


def test_a_base_chain_that_loops_or_names_nothing_fails_in_one_line(tmp_path):
    _write(tmp_path / "a.yaml", {"base": "b"})
    _write(tmp_path / "b.yaml", {"base": "a"})
    with pytest.raises(ConfigError, match=r"'base' chain loops \(a\.yaml → b\.yaml → a\.yaml\)"):
        load_config(str(tmp_path / "a.yaml"))
    _write(tmp_path / "c.yaml", {"base": "no-such-config"})
    with pytest.raises(Exception, match="config 'no-such-config' is neither a file nor a packaged config"):
        load_config(str(tmp_path / "c.yaml"))


def test_the_packaged_per_method_configs_are_short_deltas():
    from ftguard.methods.registry import all_methods

    root = Path(load_config.__code__.co_filename).parent / "configs"
    methods = set(all_methods())
    # <method>-<model>.yaml; run configs of their own (testbed-smollm2, quickstart-tiny) are not deltas
    per_method = [p for p in sorted(root.glob("*-*.yaml")) if p.stem.rsplit("-", 1)[0] in methods]
    assert len(per_method) >= 20
    for path in per_method:
        data = yaml.safe_load(path.read_text())
        assert data.get("base") in ("quickstart-tiny", "demo"), path.name
        assert len(path.read_text().splitlines()) <= 30, path.name
        load_run(path.stem)  # resolves: method names and args valid


def test_loading_a_config_and_listing_configs_do_not_import_the_training_stack():
    code = (
        "import sys, io, contextlib; from ftguard.config import load_config; from ftguard import cli;"
        "load_config('vaccine-smollm2');"
        "out = io.StringIO();"
        "contextlib.redirect_stdout(out).__enter__();"
        "cli.main(['configs']); cli.main(['configs', '--show', 'vaccine-tiny', '--resolved']);"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules];"
        "sys.stderr.write(','.join(heavy))"
    )
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert heavy.strip() == ""


def test_configs_show_prints_the_delta_or_the_resolved_config(capsys):
    assert cli.main(["configs", "--show", "vaccine-tiny"]) == 0
    delta = yaml.safe_load(capsys.readouterr().out)
    assert delta["base"] == "quickstart-tiny" and "model" not in delta
    assert cli.main(["configs", "--show", "vaccine-tiny", "--resolved"]) == 0
    full = yaml.safe_load(capsys.readouterr().out)
    assert "base" not in full and full["align"]["method"] == "vaccine" and full["model"]["name"] == "tiny"


def test_the_readme_run_config_example_resolves(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("```yaml\nname: my-run") + len("```yaml\n")
    path = tmp_path / "my-run.yaml"
    path.write_text(readme[start : readme.index("```", start)])
    resolved = load_run(str(path))
    assert resolved.config.data.alignment_benign is not None and resolved.stages == ("align", "finetune")
