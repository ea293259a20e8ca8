"""Adapter topologies (docs/methods.md, Adapter topologies) and single-stage commands reading/writing the run
dir."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ftguard import cli
from ftguard.config import load_config
from ftguard.models import load_lora, load_model, merge_lora
from ftguard.pipeline.run import run_pipeline

pytestmark = pytest.mark.slow
NO_EVAL = ["evaluate.points=[]", "align.train.max_steps=3", "finetune.train.max_steps=3"]


def _weights(path):
    return load_file(next(path.glob("*.safetensors")))


def _assert_same_model(model, weights):
    state = model.state_dict()
    for key, value in weights.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6)


def _run(tmp_path, topology):
    out = tmp_path / topology
    cfg = load_config("quickstart-tiny", [*NO_EVAL, f"adapter.topology={topology}", f"output_dir={out}"])
    run_pipeline(cfg)
    manifest = json.loads((out / "finetune" / "COMPLETE.json").read_text())
    return out, manifest


def test_double_merges_the_alignment_lora_and_trains_a_new_one(tmp_path):
    out, manifest = _run(tmp_path, "double")
    assert manifest["base_dir"] is None
    rebuilt = merge_lora(
        load_lora(load_model(str(out / "align" / "model")), out / "finetune" / "adapter", trainable=False)
    )
    _assert_same_model(rebuilt, _weights(out / "finetune" / "model"))


def test_single_keeps_training_the_alignment_lora_on_the_unmerged_base(tmp_path):
    out, manifest = _run(tmp_path, "single")
    base_dir = manifest["base_dir"]
    assert base_dir and json.loads((out / "align" / "COMPLETE.json").read_text())["base_dir"] == base_dir
    # the fine-tuned model is the base plus ONE adapter (the continued alignment LoRA), not aligned + new LoRA
    rebuilt = merge_lora(load_lora(load_model(base_dir), out / "finetune" / "adapter", trainable=False))
    _assert_same_model(rebuilt, _weights(out / "finetune" / "model"))
    align_adapter = load_file(out / "align" / "adapter" / "adapter_model.safetensors")
    tuned_adapter = load_file(out / "finetune" / "adapter" / "adapter_model.safetensors")
    assert align_adapter.keys() == tuned_adapter.keys()
    assert any(not torch.equal(align_adapter[k], tuned_adapter[k]) for k in align_adapter)


def test_full_fine_tuning_trains_every_weight_and_saves_no_adapter(tmp_path):
    out, manifest = _run(tmp_path, "full")
    assert manifest["trainable_parameters"] == manifest["total_parameters"]
    assert not (out / "finetune" / "adapter").exists()
    aligned, tuned = _weights(out / "align" / "model"), _weights(out / "finetune" / "model")
    changed = [k for k in aligned if not torch.equal(aligned[k], tuned[k])]
    assert any("mlp" in k for k in changed) and any("embed_tokens" in k for k in changed)


def test_the_full_parameter_attacker_fine_tunes_every_weight_of_the_lora_aligned_model(tmp_path):
    from ftguard.pipeline.units import build_graph
    from ftguard.resolve import load_run

    out = tmp_path / "full-attacker"
    overrides = [*NO_EVAL, "adapter.finetune_full=true", f"output_dir={out}"]
    run_pipeline(load_config("quickstart-tiny", overrides))
    align = json.loads((out / "align" / "COMPLETE.json").read_text())
    manifest = json.loads((out / "finetune" / "COMPLETE.json").read_text())
    assert align["trainable_parameters"] < align["total_parameters"] and align["adapter_dir"] == "adapter"
    assert (
        manifest["trainable_parameters"] == manifest["total_parameters"] and manifest["adapter_dir"] is None
    )
    assert not (out / "finetune" / "adapter").exists()
    aligned, tuned = _weights(out / "align" / "model"), _weights(out / "finetune" / "model")
    changed = [k for k in aligned if not torch.equal(aligned[k], tuned[k])]
    assert any("mlp" in k for k in changed) and any("embed_tokens" in k for k in changed)
    # the same aligned model as the LoRA attacker's: only the fine-tune's fingerprint differs
    lora, full = (
        build_graph(load_run("quickstart-tiny", extra)) for extra in ([], ["adapter.finetune_full=true"])
    )
    assert lora.unit("align").fingerprint == full.unit("align").fingerprint
    assert lora.unit("finetune").fingerprint != full.unit("finetune").fingerprint


@pytest.mark.parametrize("topology", ["single", "full"])
def test_the_full_parameter_attacker_needs_the_double_topology(topology):
    from ftguard.schema import ConfigError

    with pytest.raises(ConfigError, match=r"adapter\.finetune_full.*needs topology double"):
        load_config("quickstart-tiny", [f"adapter.topology={topology}", "adapter.finetune_full=true"])


def test_settings_added_later_leave_fingerprints_as_they_were_at_their_neutral_value():
    from ftguard.config import NEUTRAL_LATER_SETTINGS

    cfg = load_config("quickstart-tiny")
    data = cfg.to_dict()
    for path, neutral in NEUTRAL_LATER_SETTINGS.items():
        *parents, leaf = path
        section = data
        fresh = cfg.to_dict()  # an earlier path may have popped this one's parent (upload, then upload.score)
        for key in parents:
            assert key in fresh, f"{path}: no section {key!r}"  # a misspelt path would hide the setting
            fresh, section = fresh[key], section.get(key) if section is not None else None
            if fresh is None:  # a setting inside a section that is null by default (upload.score)
                break
        else:
            assert section.pop(leaf) == neutral  # the default is the neutral value
    import hashlib

    blob = json.dumps(data, sort_keys=True, default=str).encode()
    assert cfg.fingerprint() == hashlib.sha256(blob).hexdigest()[:16]
    assert load_config("quickstart-tiny", ["adapter.finetune_full=true"]).fingerprint() != cfg.fingerprint()


def test_single_stage_commands_compose(tmp_path, capsys):
    out = str(tmp_path / "run")
    sets = ["--set", "align.train.max_steps=3", "--set", "finetune.train.max_steps=3"]
    with pytest.raises(Exception, match="align stage .* is not complete"):
        raise_on_error(cli.main(["finetune", "quickstart-tiny", "--output-dir", out, *sets]), capsys)
    assert cli.main(["align", "quickstart-tiny", "--output-dir", out, *sets]) == 0
    assert cli.main(["finetune", "quickstart-tiny", "--output-dir", out, *sets]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["stages"] == {} and results["complete"] is False, "training commands evaluate nothing"
    assert cli.main(["evaluate", "quickstart-tiny", "--output-dir", out, *sets]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["stages"]) == {"base", "align", "finetune"} and results["complete"] is True
    capsys.readouterr()
    model_dir = str(tmp_path / "run" / "align" / "model")
    assert cli.main(["evaluate", "quickstart-tiny", "--output-dir", out, *sets, "--model", model_dir]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["harmful_score"] == results["stages"]["align"]["harmful_score"], (
        "same model, same greedy answers"
    )


def raise_on_error(code, capsys):
    if code != 0:
        raise RuntimeError(capsys.readouterr().err)
