"""The contract every registered method keeps, one row per method: adding a method = its module, its registry
line and a row here.

Each row says how to run the method for one or two steps on the tiny model. The test then checks that a wrong arg
is refused by name in one line before any work, that a training method checkpoints and resumes (interrupted
right after its first checkpoint, the rerun continues from it), that a repair completes and is not redone, and
that the method states its cost for the estimate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ftguard.methods.base import Method, PostMethod
from ftguard.methods.registry import all_methods
from ftguard.pipeline.run import run_pipeline
from ftguard.resolve import load_run
from ftguard.schema import ConfigError
from ftguard.training.trainer import FtguardTrainer

pytestmark = pytest.mark.slow

SINGLE = ["adapter.topology=single"]
# name → (stage, args small enough for the tiny model, more overrides)
CONTRACT: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "sft": ("align", {}, []),
    "vaccine": ("align", {}, []),
    "random_vaccine": ("align", {}, []),
    "tvaccine": ("align", {"n_layers": 1}, []),  # the tiny model has 2 layers; the default draws 8
    "booster": ("align", {"harmful_batch_size": 2}, SINGLE),
    "booster_vaccine": ("align", {"harmful_batch_size": 2}, SINGLE),
    "repnoise": ("align", {}, []),
    "lisa": ("finetune", {"align_steps": 1, "finetune_steps": 1}, []),
    "bso": ("finetune", {"align_steps": 1, "finetune_steps": 1}, []),
    "ewc": ("finetune", {"fisher_samples": 4, "fisher_batch_size": 2}, SINGLE),
    "vlguard": ("finetune", {"safety_samples": 4}, []),
    "vlguard_reg": ("finetune", {}, []),
    "ldifs": ("finetune", {}, []),
    # the contract runs without an align stage: V = 0 and the term is a plain L2 penalty (plumbing only)
    "asft": ("finetune", {"base_model": "tiny"}, []),
    "smart": ("finetune", {}, []),
    "panacea": ("finetune", {"harmful_batch_size": 2, "harmful_samples": 8}, SINGLE),
    "kl": ("finetune", {}, []),
    "filter": ("finetune", {"judge": "keyword"}, []),
    "recovery": ("post", {"steps": 1, "warmup_steps": 1, "save_every": 1, "n_harmful": 2, "n_task": 2}, []),
    "antidote": ("post", {"n_samples": 4}, []),
    "safelora": ("post", {"num_proj_layers": 1}, []),
    "safemerge": ("post", {"n_safety": 4, "safety_train": {"max_steps": 1}}, []),
    # at max_length 128 the SST2 task rows keep no response token, and the selection has nothing to score
    "one_shot_safety": (
        "post",
        {"pool_size": 2, "n_harmful": 2, "n_task": 2, "steps": 1},
        ["model.max_length=256"],
    ),
}
SMALL = [
    "model.max_length=128",
    "data.alignment.n=16",
    "data.finetune.n=8",
    "align.train.batch_size=2",
    "finetune.train.batch_size=2",
    "evaluate.points=[]",
]


def _run(name: str, tmp_path: Path, *more: str):
    stage, args, overrides = CONTRACT[name]
    steps = [f"{stage}.train.max_steps=2", f"{stage}.train.save_steps=1"] if stage != "post" else []
    before = {"align": ["finetune=null"], "finetune": ["align=null"], "post": []}[stage]
    shorten = (
        ["align.train.max_steps=1", "finetune.train.max_steps=1", "post.validation_n=2"]
        if stage == "post"
        else []
    )
    return load_run(
        "quickstart-tiny",
        [
            *SMALL,
            *before,
            *overrides,
            *steps,
            *shorten,
            f"{stage}.method={name}",
            f"{stage}.args={json.dumps(args)}",
            f"output_dir={tmp_path / 'run'}",
            *more,
        ],
    )


def test_the_contract_covers_every_registered_method():
    assert set(CONTRACT) == set(all_methods())


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_a_wrong_arg_is_refused_by_name_in_one_line(name, tmp_path):
    stage = CONTRACT[name][0]
    with pytest.raises(ConfigError) as exc:
        _run(name, tmp_path, f"{stage}.args.no_such_arg=1")
    message = str(exc.value)
    assert f"{stage}.args" in message and "no_such_arg" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_the_method_states_its_cost(name):
    cls = all_methods()[name]
    if issubclass(cls, PostMethod):
        assert cls.cost is not PostMethod.cost, f"{name}: add a cost() for the estimate"
    elif name != "filter":  # the filter's factor is its wrapped method's
        declared = [k for k in cls.__mro__ if "pass_factor" in vars(k) and k is not Method]
        assert declared or name == "sft", f"{name}: state its pass_factor"


@pytest.mark.parametrize("name", sorted(n for n, (stage, _, _) in CONTRACT.items() if stage != "post"))
def test_a_training_method_checkpoints_and_resumes(name, tmp_path, monkeypatch):
    stage = CONTRACT[name][0]
    resolved = _run(name, tmp_path)
    real = FtguardTrainer._save_checkpoint

    def save_then_stop(self, model, trial):
        real(self, model, trial)
        raise KeyboardInterrupt  # as if killed right after the first checkpoint was written

    monkeypatch.setattr(FtguardTrainer, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(resolved, train=(stage,), evaluate=False)
    unit = tmp_path / "run" / stage
    assert (unit / "checkpoints" / "checkpoint-1").is_dir() and not (unit / "COMPLETE.json").exists()

    monkeypatch.setattr(FtguardTrainer, "_save_checkpoint", real)
    run_pipeline(resolved, train=(stage,), evaluate=False)
    manifest = json.loads((unit / "COMPLETE.json").read_text())
    assert (manifest["method"], manifest["resumed_from"], manifest["steps"]) == (name, "checkpoint-1", 2)


@pytest.mark.parametrize("name", sorted(n for n, (stage, _, _) in CONTRACT.items() if stage == "post"))
def test_a_repair_completes_and_is_not_redone(name, tmp_path, monkeypatch):
    resolved = _run(name, tmp_path)
    assert run_pipeline(resolved, evaluate=False)["complete"]
    manifest = json.loads((tmp_path / "run" / "post" / "COMPLETE.json").read_text())
    assert manifest["method"] == name

    def never(*_a, **_k):
        raise AssertionError("a complete repair was run again")

    monkeypatch.setattr(type(resolved.method("post")), "repair", never)
    assert run_pipeline(resolved, evaluate=False)["complete"]
