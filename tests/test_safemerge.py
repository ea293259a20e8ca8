"""SafeMERGE (post stage): layer selection, merged weights and untouched weights against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import ftguard.methods.safemerge  # noqa: F401  (registers "safemerge")
from ftguard.config import AdapterConfig, LoraConfig
from ftguard.errors import FtguardError
from ftguard.methods.context import ModelRef, PostContext
from ftguard.methods.safemerge import SafeMerge, SafeMergeConfig, merged_factors
from ftguard.schema import ConfigError
from tiny import tiny_llama

ALIGN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
USER_TARGETS = ["q_proj", "v_proj"]
USER_SCALING = 8 / 4  # lora_alpha / r of the user's LoRA
SAFETY_SCALING = 16 / 4  # the safety LoRA's: a different scaling, to see that each factor carries its own

pytestmark = pytest.mark.usefixtures("one_thread")


def _lora(model, targets, seed, alpha=8, r=4):
    """A LoRA whose B is random (PEFT starts it at zero), as after training."""
    peft = get_peft_model(
        model, PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    """base → aligned (a merged LoRA on q/k/v/o) → the user's LoRA on q/v; a safety LoRA on q/v of the aligned
    model, saved where the repair keeps the one it trains (so the merge is checked on known factors)."""
    root = tmp_path_factory.mktemp("safemerge")
    base = tiny_llama(num_hidden_layers=3)
    base.save_pretrained(root / "base")
    aligned = _lora(base, ALIGN_TARGETS, seed=1).merge_and_unload()
    aligned.save_pretrained(root / "aligned")
    user = _lora(aligned, USER_TARGETS, seed=2)
    user.save_pretrained(root / "adapter")
    user.merge_and_unload().save_pretrained(root / "finetuned")
    torch.manual_seed(4)
    safety = _lora(LlamaForCausalLM.from_pretrained(root / "aligned"), USER_TARGETS, seed=3, alpha=16)
    safety.save_pretrained(root / "safety")
    return SimpleNamespace(
        root=root,
        base=load_file(root / "base" / "model.safetensors"),
        aligned=load_file(root / "aligned" / "model.safetensors"),
        finetuned=load_file(root / "finetuned" / "model.safetensors"),
        user=load_file(root / "adapter" / "adapter_model.safetensors"),
        safety=load_file(root / "safety" / "adapter_model.safetensors"),
    )


def _ctx(models, tmp_path: Path, safety: str = "safety") -> PostContext:
    work = tmp_path / "work"
    (work / "safety_adapter").mkdir(parents=True)
    for f in (models.root / safety).iterdir():
        (work / "safety_adapter" / f.name).symlink_to(f)
    (work / "safety_adapter" / "summary.json").write_text(json.dumps({"examples": 0}))
    root = models.root
    run = SimpleNamespace(
        seed=43,
        model=SimpleNamespace(dtype="float32", trust_remote_code=False),
        adapter=AdapterConfig(finetune=LoraConfig(target_modules=USER_TARGETS)),
    )
    return PostContext(
        run=run,
        key="post-test",
        base=ModelRef(str(root / "base")),
        aligned=ModelRef(str(root / "aligned")),
        finetuned=ModelRef(str(root / "finetuned"), adapter_dir=str(root / "adapter")),
        tokenizer=None,
        plan=None,
        work_dir=work,
    )


def _repair(models, tmp_path, **cfg):
    model, report = SafeMerge(SafeMergeConfig(**cfg)).repair(_ctx(models, tmp_path))
    return {k: v.detach() for k, v in model.state_dict().items()}, report


def _modules() -> list[str]:
    return [f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in USER_TARGETS]


def _factors(adapter: dict, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    key = f"base_model.model.{module}"
    return adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]


def _hand_similarity(models, module: str) -> float:
    a, b = _factors(models.user, module)
    delta = USER_SCALING * b @ a
    v = models.aligned[f"{module}.weight"] - models.base[f"{module}.weight"]
    c = v @ v.T / torch.sqrt((v**2).sum())  # SafeLoRA's C, formed explicitly
    cdelta = c @ delta
    return float((cdelta * delta).sum() / (cdelta.norm() * delta.norm()))


def _hand_merge(models, module: str, w_f: float, w_s: float) -> torch.Tensor:
    """W_A + B·A with A = √(w_f s_f)·A_f + √(w_s s_s)·A_s and B likewise (PEFT's linear, scaling 1)."""
    (a_f, b_f), (a_s, b_s) = _factors(models.user, module), _factors(models.safety, module)
    f, s = math.sqrt(w_f * USER_SCALING), math.sqrt(w_s * SAFETY_SCALING)
    return models.aligned[f"{module}.weight"] + (f * b_f + s * b_s) @ (f * a_f + s * a_s)


def _threshold_between(models, k: int) -> tuple[float, dict[str, float]]:
    """A threshold with exactly the k least similar layers below it, away from any boundary."""
    similarity = {m: _hand_similarity(models, m) for m in _modules()}
    ranked = sorted(similarity.values())
    assert ranked[k] - ranked[k - 1] > 1e-3, "layers too close to separate"
    return (ranked[k - 1] + ranked[k]) / 2, similarity


# --- selection and merge on saved models ---------------------------------------------------------------------------


def test_selection_is_the_hand_computed_similarity_below_the_threshold(models, tmp_path):
    tau, similarity = _threshold_between(models, 3)
    weights, report = _repair(models, tmp_path, threshold=tau)

    assert [r["module"] for r in report["per_layer"]] == _modules()
    for row in report["per_layer"]:
        assert row["similarity"] == pytest.approx(similarity[row["module"]], abs=1e-5)
        assert row["merged"] == (similarity[row["module"]] < tau)
    assert report["merged"] == 3 and report["layers"] == 6
    assert report["safety_adapter"]["resumed"] is True  # the prepared adapter, not a new one


def test_merged_layers_are_the_factor_wise_merge_and_the_rest_is_f_bit_for_bit(models, tmp_path):
    tau, similarity = _threshold_between(models, 3)
    weights, report = _repair(models, tmp_path, threshold=tau, finetuned_weight=0.7, safety_weight=0.4)
    merged = {m for m in similarity if similarity[m] < tau}
    assert merged == {r["module"] for r in report["per_layer"] if r["merged"]}

    for name, tensor in models.finetuned.items():
        module = name.removesuffix(".weight")
        if module in merged:
            expected = _hand_merge(models, module, 0.7, 0.4)
            assert torch.allclose(weights[name], expected, atol=1e-5), name
            # The factor-wise merge has cross terms: it is not the weighted sum of the two updates.
            (a_f, b_f), (a_s, b_s) = _factors(models.user, module), _factors(models.safety, module)
            naive = models.aligned[name] + 0.7 * USER_SCALING * b_f @ a_f + 0.4 * SAFETY_SCALING * b_s @ a_s
            assert not torch.allclose(weights[name], naive, atol=1e-3), name
        else:
            assert torch.equal(weights[name], tensor), f"{name} must be F's weight, bit for bit"


def test_threshold_edges_merge_nothing_or_everything(models, tmp_path):
    weights, report = _repair(models, tmp_path / "none", threshold=-1.0)
    assert report["merged"] == 0
    assert all(torch.equal(weights[k], v) for k, v in models.finetuned.items())

    weights, report = _repair(models, tmp_path / "all", threshold=1.0)
    assert report["merged"] == 6
    for module in _modules():
        assert torch.allclose(weights[f"{module}.weight"], _hand_merge(models, module, 0.8, 0.2), atol=1e-5)


def test_dare_linear_keeps_or_drops_each_factor_entry_and_rescales(models, tmp_path):
    g = torch.Generator().manual_seed(9)
    ft = (torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g), 2.0)
    safe = (torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g), 4.0)
    cfg = SafeMergeConfig(
        combination_type="dare_linear", density=0.5, finetuned_weight=0.8, safety_weight=0.2
    )
    torch.manual_seed(0)
    a, b = merged_factors(ft, safe, cfg)
    f, s = math.sqrt(0.8 * 2.0) / 0.5, math.sqrt(0.2 * 4.0) / 0.5
    for merged, x_f, x_s in ((a, ft[0], safe[0]), (b, ft[1], safe[1])):
        options = torch.stack([torch.zeros_like(x_f), f * x_f, s * x_s, f * x_f + s * x_s])
        hit = (options - merged).abs() < 1e-5
        assert hit.any(dim=0).all(), "each entry is one of: both dropped, one kept, both kept (rescaled)"
        assert hit[0].any() and hit[3].any()  # drops happen, and so do kept pairs
    linear = merged_factors(ft, safe, SafeMergeConfig())
    dense = merged_factors(ft, safe, SafeMergeConfig(combination_type="dare_linear", density=1.0))
    assert all(torch.allclose(x, y) for x, y in zip(linear, dense, strict=True))  # density 1 drops nothing

    # In the repair: the run's seed fixes the drops, and only the merged layers differ from F.
    first, report = _repair(models, tmp_path / "a", threshold=1.0, combination_type="dare_linear")
    again, _ = _repair(models, tmp_path / "b", threshold=1.0, combination_type="dare_linear")
    assert report["density"] == 0.5 and all(torch.equal(first[k], again[k]) for k in first)
    module = _modules()[0]
    assert not torch.allclose(first[f"{module}.weight"], _hand_merge(models, module, 0.8, 0.2), atol=1e-3)


def test_a_safety_lora_of_another_rank_is_refused(models, tmp_path):
    other = _lora(LlamaForCausalLM.from_pretrained(models.root / "aligned"), USER_TARGETS, seed=5, r=2)
    other.save_pretrained(models.root / "safety-r2")
    with pytest.raises(FtguardError, match="different ranks"):
        SafeMerge(SafeMergeConfig()).repair(_ctx(models, tmp_path, safety="safety-r2"))


# --- config ----------------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_authors_and_bad_values_fail_by_name():
    cfg = SafeMergeConfig()
    assert (cfg.threshold, cfg.finetuned_weight, cfg.safety_weight, cfg.combination_type) == (
        0.35,
        0.8,
        0.2,
        "linear",
    )
    bad = {
        "threshold": 1.5,
        "finetuned_weight": -0.1,
        "safety_weight": -0.1,
        "density": 0.0,
        "n_safety": 0,
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=f"post.args.{key}"):
            SafeMerge.parse_args({key: value}, prefix="post.args")
    with pytest.raises(ConfigError, match="post.args.density"):
        SafeMerge.parse_args({"density": 1.5}, prefix="post.args")
    with pytest.raises(ConfigError, match="post.args.combination_type"):
        SafeMerge.parse_args({"combination_type": "ties"}, prefix="post.args")
    with pytest.raises(ConfigError, match="post.args.treshold"):
        SafeMerge.parse_args({"treshold": 0.3}, prefix="post.args")
    with pytest.raises(ConfigError, match="post.args.safety_train.learning_rate"):
        SafeMerge.parse_args({"safety_train": {"learning_rate": -1}}, prefix="post.args")
    with pytest.raises(ConfigError, match="safety_train.learning_rat"):
        SafeMerge.parse_args({"safety_train": {"learning_rat": 1e-4}}, prefix="post.args")


def test_runs_it_cannot_repair_are_refused_before_any_work():
    from ftguard.resolve import load_run

    with pytest.raises(ConfigError, match="adapter.topology"):
        load_run("safemerge-tiny", ["adapter.topology=single"])
    with pytest.raises(ConfigError, match="align"):
        load_run("safemerge-tiny", ["align=null"])
    resolved = load_run("safemerge-tiny", ["post.args.safety_train={max_steps: 3}"])
    from ftguard.methods.safemerge import safety_recipe

    recipe = safety_recipe(resolved.config, resolved.method("post").config.safety_train)
    # the user's fine-tuning recipe, with the one key changed
    assert recipe.max_steps == 3 and recipe.learning_rate == resolved.config.finetune.train.learning_rate


@pytest.mark.slow
def test_pipeline_runs_safemerge_end_to_end(tmp_path):
    from ftguard import cli

    # the packaged config: quickstart-tiny + post: {method: safemerge, args: {n_safety: 64, ...}}
    args = ["--output-dir", str(tmp_path)]
    for setting in (
        "evaluate.points=[post]",
        "evaluate.harmful_prompts.n=4",
        "evaluate.task_n=4",
        "evaluate.over_refusal_prompts.n=4",
        "post.validation_n=4",
        "post.args.threshold=0.45",  # about half of the 8 matrices on this tiny model
    ):
        args += ["--set", setting]
    assert cli.main(["run", "safemerge-tiny", *args]) == 0
    manifest = json.loads((tmp_path / "post" / "COMPLETE.json").read_text())
    report = manifest["report"]
    assert manifest["method"] == "safemerge" and report["layers"] == 8
    # the safety LoRA was trained here, on the 64 alignment refusals, with the fine-tune's 8 steps
    assert report["safety_adapter"]["examples"] == 64 and report["safety_adapter"]["steps"] == 8
    assert report["safety_adapter"]["resumed"] is False
    chosen = {r["module"] for r in report["per_layer"] if r["merged"]}
    assert chosen == {r["module"] for r in report["per_layer"] if r["similarity"] < 0.45}
    assert 0 < len(chosen) < 8, "pick a threshold that merges some layers and keeps others"
    tuned = load_file(next((tmp_path / "finetune" / "model").glob("*.safetensors")))
    repaired = load_file(next((tmp_path / "post" / "model").glob("*.safetensors")))
    assert {k.removesuffix(".weight") for k in tuned if not torch.equal(tuned[k], repaired[k])} == chosen
    assert not (tmp_path / "post" / "work").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert "harmful_score" in results["stages"]["post"]
