"""The Axolotl plug-in (ftguard.integrations.axolotl): ftguard's evaluation and release gate after an Axolotl job.

The hook is called as Axolotl calls it, on folders shaped as Axolotl's ``train()`` leaves them (a LoRA job: the
adapter, the base model's config.json and the tokenizer; a full fine-tune: the model and tokenizer). Its numbers
are checked against ``ftguard evaluate CONFIG --model DIR`` of the same model, merged here with PEFT directly.

When Axolotl is importable (``pip install axolotl``; for these tests ``pip install --no-deps axolotl addict`` and a
few small modules of its CLI suffice), the last tests run the plug-in through Axolotl's own code: its BasePlugin,
its PluginManager loading the plug-in by name, its config validation with the plug-in's args merged in, and its
``do_train`` calling ``post_train_unload`` after a stand-in ``train()``. Otherwise they are skipped, and the others
use a stand-in for Axolotl's DictDefault.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ftguard import cli
from ftguard.errors import FtguardError
from ftguard.integrations.axolotl import FtguardPlugin
from ftguard.metrics import METRICS
from ftguard.models import load_model, load_tokenizer, resolve_model

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = "quickstart-tiny"
PLUGIN = "ftguard.integrations.axolotl.FtguardPlugin"

try:
    from axolotl.utils.dict import DictDefault
except ImportError:

    class DictDefault(dict):
        """Axolotl's config type as plug-ins see it: a dict whose missing keys read as None, also as attributes."""

        def __getattr__(self, name):
            return self.get(name)


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_dir() -> str:
    return resolve_model("tiny")


@pytest.fixture(scope="module")
def lora_job(base_dir, tmp_path_factory) -> Path:
    """What a LoRA job leaves in output_dir: save_initial_configs' tokenizer and model config, then the adapter."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("axolotl") / "lora-out"
    model = load_model(base_dir)
    peft = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: PEFT's lora_B = 0 would leave the model unchanged
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    load_tokenizer(base_dir).save_pretrained(out)
    model.config.save_pretrained(out)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def full_job(base_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("axolotl") / "full-out"
    model = load_model(base_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    load_tokenizer(base_dir).save_pretrained(out)
    return out


def job_cfg(base_dir, output_dir, ftguard_out, **keys) -> DictDefault:
    return DictDefault(
        base_model=base_dir,
        output_dir=str(output_dir),
        plugins=[PLUGIN],
        ftguard_config=CONFIG,
        ftguard_output_dir=str(ftguard_out),
        **keys,
    )


def run_hook(cfg) -> dict:
    plugin = FtguardPlugin()
    plugin.register(cfg)
    plugin.post_train_unload(cfg)
    return json.loads((Path(cfg["ftguard_output_dir"]) / "results.json").read_text())


def ftguard_evaluate(base_dir, model_dir, out, capsys) -> dict:
    """``ftguard evaluate CONFIG --model DIR``, the command line's metrics."""
    capsys.readouterr()
    args = [
        "evaluate",
        CONFIG,
        "--output-dir",
        str(out),
        "--set",
        f"model.name={base_dir}",
        "--model",
        str(model_dir),
    ]
    assert cli.main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def answers(run_dir, key_prefix) -> list[str]:
    (unit,) = Path(run_dir, "eval").glob(f"custom-{key_prefix}*")
    lines = (unit / "generations.jsonl").read_text().splitlines()
    return [json.loads(line)["answer"] for line in lines]


def same_metrics(entry: dict, metrics: dict) -> None:
    measured = [m for m in METRICS if m in metrics]
    assert {"harmful_score", "finetune_accuracy", "over_refusal"} <= set(measured)
    for name in measured:
        assert entry[name] == metrics[name], name
    assert entry["counts"] == metrics["counts"]


def write_policy(tmp_path, rules: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n" + rules)
    return str(path)


# ----------------------------------------------------------------------------------------- the hook


def test_a_lora_job_is_scored_as_ftguard_scores_the_merged_adapter(base_dir, lora_job, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    results = run_hook(job_cfg(base_dir, lora_job, tmp_path / "ft", adapter="lora"))
    assert results["complete"] is True
    assert set(results["stages"]) == {"finetune"}, "no policy, no baseline: only the trained model"
    entry = results["stages"]["finetune"]
    assert entry["stage"] == "finetune" and entry["method"] == "axolotl"
    assert (tmp_path / "ft" / "results.md").is_file() and not (tmp_path / "ft" / "verdict.json").exists()
    assert not list((tmp_path / "ft").glob(".merged-*")), "the merged copy is deleted after the evaluation"

    # Independently: PEFT's own merge, evaluated by the command line.
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    merged = PeftModel.from_pretrained(base, str(lora_job)).merge_and_unload()
    merged_dir = tmp_path / "merged"
    merged.save_pretrained(merged_dir)
    load_tokenizer(str(lora_job)).save_pretrained(merged_dir)
    own = ftguard_evaluate(base_dir, merged_dir, tmp_path / "own", capsys)
    same_metrics(entry, own)
    assert answers(tmp_path / "ft", "axolotl-") == answers(tmp_path / "own", "merged")
    # The comparison is not vacuous: the adapter changes the answers.
    ftguard_evaluate(base_dir, base_dir, tmp_path / "own-base", capsys)
    assert answers(tmp_path / "own", "merged") != answers(tmp_path / "own-base", "")


@pytest.mark.parametrize("relora", [False, True])
def test_a_full_finetune_is_scored_in_place(base_dir, full_job, lora_job, tmp_path, capsys, relora):
    job = full_job
    if relora:  # Axolotl pre-saves adapter_config.json for any adapter; ReLoRA then saves the merged model
        job = tmp_path / "relora-out"
        shutil.copytree(full_job, job)
        shutil.copy(lora_job / "adapter_config.json", job)
    results = run_hook(job_cfg(base_dir, job, tmp_path / "ft", adapter="lora" if relora else None))
    # (`ftguard evaluate --model` of the ReLoRA folder itself fails: transformers looks for the adapter's weights.)
    own = ftguard_evaluate(base_dir, full_job, tmp_path / "own", capsys)
    same_metrics(results["stages"]["finetune"], own)
    assert answers(tmp_path / "ft", "axolotl-") == answers(tmp_path / "own", full_job.name)
    assert not list((tmp_path / "ft").glob(".model-*")), "the folder without adapter_config.json is deleted"
    assert results["axolotl"]["output_dir"] == str(job.resolve())


def test_results_of_an_earlier_job_do_not_outlive_a_failed_one(base_dir, full_job, tmp_path):
    cfg = job_cfg(base_dir, full_job, tmp_path / "ft", ftguard_policy="release")
    with pytest.raises(FtguardError):
        run_hook(cfg)
    assert (tmp_path / "ft" / "verdict.json").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FtguardError, match="holds no saved model"):
        run_hook({**cfg, "output_dir": str(tmp_path / "empty")})
    assert not list((tmp_path / "ft").glob("*.json")), "the earlier job's results and verdict are removed"


def test_a_blocking_policy_fails_the_job_and_the_verdict_is_recorded(base_dir, lora_job, tmp_path):
    # The random tiny model answers no sst2 item right (FA 0): FA ≥ 100 blocks it. The relative rule makes the
    # plug-in evaluate base_model as the baseline.
    policy = write_policy(
        tmp_path,
        "  - {metric: FA, tier: must_pass, min: 100}\n"
        "  - {metric: HS, tier: must_pass, relative_to: aligned, max_rise: 100}\n",
    )
    cfg = job_cfg(base_dir, lora_job, tmp_path / "ft", adapter="lora", ftguard_policy=policy)
    with pytest.raises(FtguardError, match=r"blocks the model: FA ≥ 100 at finetune: 0\.0 < 100\.0") as info:
        run_hook(cfg)
    assert "\n" not in str(info.value)
    verdict = json.loads((tmp_path / "ft" / "verdict.json").read_text())
    assert verdict["passed"] is False and verdict["exit_code"] == 1
    assert [r["verdict"] for r in verdict["rows"]] == ["fail", "pass"]
    assert verdict["rows"][1]["baseline"]["point"] == "base", "aligned = the model the job fine-tuned"
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert list(results["stages"]) == ["base", "finetune"]
    base_answers = answers(tmp_path / "ft", "base-")
    assert base_answers != answers(tmp_path / "ft", "axolotl-"), (
        "the baseline is the base model, not the job's"
    )
    units = sorted(p.name for p in (tmp_path / "ft" / "eval").iterdir())

    # ftguard_fail_on_block: false records the same verdict, and the job goes on; the evaluations are reused.
    cfg["ftguard_fail_on_block"] = False
    run_hook(cfg)
    assert json.loads((tmp_path / "ft" / "verdict.json").read_text())["passed"] is False
    assert sorted(p.name for p in (tmp_path / "ft" / "eval").iterdir()) == units

    cfg["ftguard_policy"] = write_policy(tmp_path, "  - {metric: FA, tier: must_pass, min: 0}\n")
    cfg["ftguard_fail_on_block"] = True
    results = run_hook(cfg)
    assert json.loads((tmp_path / "ft" / "verdict.json").read_text())["passed"] is True
    assert list(results["stages"]) == ["finetune"], "an absolute policy needs no baseline"


def test_without_a_baseline_a_relative_rule_fails_closed(base_dir, full_job, tmp_path):
    policy = write_policy(
        tmp_path, "  - {metric: HS, tier: must_pass, relative_to: aligned, max_rise: 100}\n"
    )
    cfg = job_cfg(base_dir, full_job, tmp_path / "ft", ftguard_policy=policy, ftguard_baseline=False)
    with pytest.raises(FtguardError, match="baseline: no evaluated align point"):
        run_hook(cfg)


def test_a_retrained_model_is_evaluated_afresh(base_dir, full_job, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(full_job, job)
    cfg = job_cfg(base_dir, job, tmp_path / "ft")
    run_hook(cfg)
    model = load_model(str(job))
    with torch.no_grad():
        model.lm_head.weight.neg_()  # a different model saved into the same output_dir
    model.save_pretrained(job)
    run_hook(cfg)
    units = sorted((tmp_path / "ft" / "eval").glob("custom-axolotl-*"), key=lambda p: p.stat().st_mtime_ns)
    assert len(units) == 2, "not the first model's evaluation again"
    first, second = ([json.loads(x)["answer"] for x in (u / "generations.jsonl").open()] for u in units)
    assert first != second


def test_only_rank_zero_evaluates_and_alone(base_dir, full_job, tmp_path, monkeypatch):
    cfg = job_cfg(base_dir, full_job, tmp_path / "ft")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    FtguardPlugin().post_train_unload(cfg)
    assert not (tmp_path / "ft").exists(), "rank 1 returns at once"
    monkeypatch.setenv("RANK", "0")
    seen = {}
    import ftguard.pipeline.run as run_module

    evaluate = run_module.evaluate_model_dir

    def spy(*args, **kwargs):
        from ftguard import distributed

        seen["world"] = distributed.world_size()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_model_dir", spy)
    FtguardPlugin().post_train_unload(cfg)
    assert seen["world"] == 1 and (tmp_path / "ft" / "results.json").is_file()
    import os

    assert os.environ["WORLD_SIZE"] == "2" and os.environ["RANK"] == "0", (
        "the launch's environment is restored"
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"ftguard_config": None}, r"'ftguard_config' is required"),
        ({"ftguard_config": "no-such-config"}, r"no-such-config"),
        ({"ftguard_policy": "no-such-policy.yaml"}, r"policy file no-such-policy.yaml not found"),
        ({"ftguard_fail_on_block": "maybe"}, r"'ftguard_fail_on_block' must be true or false, got 'maybe'"),
        ({"ftguard_set": "evaluate.max_new_tokens=4"}, r"'ftguard_set' must be a list"),
        ({"ftguard_set": ["evaluate.max_new_tokns=4"]}, r"evaluate.max_new_tokns"),
        ({"ftguard_polcy": "release"}, r"unknown key 'ftguard_polcy'; did you mean 'ftguard_policy'"),
        ({"use_ray": True}, r"Ray launches"),
    ],
)
def test_bad_keys_fail_in_one_line_before_training(base_dir, tmp_path, keys, message):
    cfg = job_cfg(base_dir, tmp_path / "out", tmp_path / "ft")
    cfg.update(keys)
    if cfg["ftguard_config"] is None:
        del cfg["ftguard_config"]
    with pytest.raises(FtguardError, match=message) as info:
        FtguardPlugin().register(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ft").exists()


def test_an_output_dir_without_a_model_fails_clearly(base_dir, tmp_path):
    (tmp_path / "out").mkdir()
    cfg = job_cfg(base_dir, tmp_path / "out", tmp_path / "ft")
    with pytest.raises(FtguardError, match="holds no saved model") as info:
        FtguardPlugin().post_train_unload(cfg)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- Axolotl's own code


def axolotl_module(name: str):
    return pytest.importorskip(name, reason="axolotl is not installed (pip install ftguard[axolotl])")


def test_the_plugin_is_an_axolotl_plugin_with_its_hook_signatures():
    base = axolotl_module("axolotl.integrations.base").BasePlugin
    assert issubclass(FtguardPlugin, base)
    for hook in ("register", "get_input_args", "post_train_unload"):
        ours = list(inspect.signature(getattr(FtguardPlugin, hook)).parameters)
        assert ours == list(inspect.signature(getattr(base, hook)).parameters), hook


@pytest.fixture
def plugin_manager(monkeypatch):
    """A fresh PluginManager singleton for the test, the previous one restored after it."""
    manager_cls = axolotl_module("axolotl.integrations.base").PluginManager
    monkeypatch.setattr(manager_cls, "_instance", None)
    return manager_cls.get_instance()


AXOLOTL_JOB = {
    "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
    "adapter": "lora",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_target_modules": ["q_proj", "v_proj"],
    "micro_batch_size": 1,
    "num_epochs": 1,
    "learning_rate": 1e-4,
    "sequence_len": 64,
}


def validated(plugin_manager, cfg):
    """Axolotl's load_cfg steps for plug-ins: register by name, plugin.register(raw cfg), validate the merged schema."""
    from axolotl.utils.config import validate_config

    for name in cfg["plugins"]:
        plugin_manager.register(name)
    for plugin in plugin_manager.plugins.values():
        plugin.register(cfg)
    return validate_config(cfg)


def test_axolotl_loads_the_plugin_and_validates_its_keys(plugin_manager, base_dir, tmp_path):
    axolotl_module("axolotl.utils.config")
    cfg = job_cfg(base_dir, tmp_path / "out", tmp_path / "ft", ftguard_policy="release", **AXOLOTL_JOB)
    checked = validated(plugin_manager, cfg)
    assert isinstance(plugin_manager.plugins[PLUGIN], FtguardPlugin)
    assert plugin_manager.get_input_args() == ["ftguard.integrations.axolotl.FtguardArgs"]
    assert (checked.ftguard_config, checked.ftguard_policy) == (CONFIG, "release")
    assert checked.ftguard_fail_on_block is True and checked.ftguard_set == [], "the args' defaults"
    from axolotl.utils.config import validate_config

    wrong = job_cfg(base_dir, tmp_path / "out", tmp_path / "ft", ftguard_set={"not": "a list"}, **AXOLOTL_JOB)
    with pytest.raises(Exception, match="ftguard_set"):  # pydantic's, when the plug-in's register is bypassed
        validate_config(wrong)


def test_axolotl_do_train_gates_the_model_it_saved(plugin_manager, base_dir, lora_job, tmp_path, monkeypatch):
    train_cli = axolotl_module("axolotl.cli.train")
    from axolotl.cli.args import TrainerCliArgs

    policy = write_policy(tmp_path, "  - {metric: FA, tier: must_pass, min: 100}\n")
    cfg = job_cfg(base_dir, tmp_path / "out", tmp_path / "ft", ftguard_policy=policy, **AXOLOTL_JOB)
    cfg = validated(plugin_manager, cfg)

    def train(cfg, dataset_meta):
        """Axolotl's train() in what matters here: the adapter and tokenizer saved to output_dir."""
        shutil.copytree(lora_job, cfg.output_dir)
        return SimpleNamespace(), SimpleNamespace(), SimpleNamespace()

    # do_train looks these up in its module's globals (lazily imported otherwise, pulling in the training stack)
    stand_ins = {"train": train, "load_datasets": lambda **kwargs: SimpleNamespace()}
    stand_ins["load_preference_datasets"] = lambda **kwargs: None
    for name, value in stand_ins.items():
        monkeypatch.setitem(vars(train_cli), name, value)
    with pytest.raises(FtguardError, match="FA ≥ 100 at finetune"):
        train_cli.do_train(cfg, TrainerCliArgs())
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["axolotl"]["adapter"] == "lora" and "finetune" in results["stages"]
