"""The post stage's plumbing: config, data, units, resume/skip, evaluation point, `ftguard recover`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from ftguard import cli
from ftguard.config import load_config
from ftguard.methods.base import PostMethod
from ftguard.methods.registry import _METHODS
from ftguard.resolve import load_run
from ftguard.schema import ConfigError

pytestmark = pytest.mark.slow


@dataclass
class _ShrinkConfig:
    factor: float = field(default=0.5, metadata={"help": "scale of the LM head"})


class _ShrinkHead(PostMethod):
    """A stand-in repair: scales the LM head and records what it saw."""

    name = "test_shrink_head"
    paper = "test"
    config_class = _ShrinkConfig
    seen: list[dict] = []

    def repair(self, ctx):
        model = ctx.load(ctx.finetuned)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(self.config.factor)
        _ShrinkHead.seen.append(
            {
                "key": ctx.key,
                "p": ctx.harmful_ratio,
                "aligned": ctx.aligned.model_dir,
                "base": ctx.base.model_dir,
                "finetuned": ctx.finetuned.model_dir,
                "validation": len(ctx.plan.task_validation),
                "work": ctx.work_dir.is_dir(),
            }
        )
        return model, {"scaled": self.config.factor}


@pytest.fixture(autouse=True, scope="module")
def _shrink_head_registered():
    # For this module only: other modules go through every registered method.
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(_METHODS, _ShrinkHead.name, _ShrinkHead)
        yield


def _cfg(tmp_path, *extra):
    return [
        "--output-dir",
        str(tmp_path),
        "--set",
        "post.method=test_shrink_head",
        "--set",
        "post.validation_n=8",
        "--set",
        "data.finetune.harmful_ratio=[0.0, 0.5]",
        "--set",
        "evaluate.harmful_prompts.n=4",
        "--set",
        "evaluate.task_n=4",
        "--set",
        "evaluate.over_refusal_prompts.n=4",
        *sum((["--set", e] for e in extra), []),
    ]


def test_run_with_a_post_stage_repairs_each_finetune_and_evaluates_it(tmp_path):
    _ShrinkHead.seen.clear()
    assert cli.main(["run", "quickstart-tiny", *_cfg(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"]
    assert {"post-p0", "post-p0.5"} <= set(results["stages"])
    entry = results["stages"]["post-p0.5"]
    assert (entry["stage"], entry["method"], entry["harmful_ratio"]) == ("post", "test_shrink_head", 0.5)
    assert "harmful_score" in entry and "over_refusal" in entry
    assert [s["key"] for s in _ShrinkHead.seen] == ["post-p0", "post-p0.5"]
    seen = _ShrinkHead.seen[1]
    assert seen["finetuned"].endswith("finetune-p0.5/model") and seen["aligned"].endswith("align/model")
    assert seen["validation"] == 8 and seen["work"] and seen["p"] == 0.5
    manifest = json.loads((tmp_path / "post-p0.5" / "COMPLETE.json").read_text())
    assert manifest["report"] == {"scaled": 0.5} and not (tmp_path / "post-p0.5" / "work").exists()
    # a repair that does not train says nothing of its precision: the weights' dtype stands for it
    assert manifest["precision"] == "float32"
    assert results["trained"]["post-p0.5"] == {
        "method": "test_shrink_head",
        "precision": "float32",
        "hardware": manifest["hardware"],
        "steps": None,
        "runtime_s": manifest["runtime_s"],
        "report": {"scaled": 0.5},
    }
    from safetensors.torch import load_file

    tuned = load_file(next((tmp_path / "finetune-p0.5" / "model").glob("*.safetensors")))
    repaired = load_file(next((tmp_path / "post-p0.5" / "model").glob("*.safetensors")))
    head = next(k for k in tuned if "lm_head" in k or "embed_tokens" in k)
    assert torch.allclose(repaired[head], tuned[head] * 0.5)

    # a re-run skips everything; `ftguard recover` with another factor refuses the finished directory
    _ShrinkHead.seen.clear()
    assert cli.main(["run", "quickstart-tiny", *_cfg(tmp_path)]) == 0
    assert _ShrinkHead.seen == []
    assert cli.main(["recover", "quickstart-tiny", *_cfg(tmp_path, "post.args.factor=0.25")]) == 2
    assert (
        cli.main(["recover", "quickstart-tiny", *_cfg(tmp_path, "post.args.factor=0.25"), "--overwrite"]) == 0
    )
    assert [s["key"] for s in _ShrinkHead.seen] == ["post-p0", "post-p0.5"], "only the post units are redone"


def test_post_config_is_validated_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="post.args.factr"):
        load_run("quickstart-tiny", ["post.method=test_shrink_head", "post.args.factr=2"])
    with pytest.raises(ConfigError, match="post.method"):
        load_run("quickstart-tiny", ["post.method=sft"])
    with pytest.raises(ConfigError, match="post"):
        load_run(
            "quickstart-tiny", ["post.method=test_shrink_head", "finetune=null", "evaluate.points=[base]"]
        )
    cfg = load_config("quickstart-tiny")
    assert cfg.post is None and "post" not in cfg.evaluate.points
