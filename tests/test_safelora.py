"""SafeLoRA (post stage): projections, layer selection and repaired weights against hand computations."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import ftguard.methods.safelora  # noqa: F401  (registers "safelora")
from ftguard.config import AdapterConfig
from ftguard.errors import FtguardError
from ftguard.methods.context import ModelRef, PostContext
from ftguard.methods.safelora import SafeLora, SafeLoraConfig, projected_update
from ftguard.schema import ConfigError
from tiny import tiny_llama

ALIGN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
USER_TARGETS = ["q_proj", "v_proj"]
USER_SCALING = 8 / 4  # lora_alpha / r of the user's LoRA below


pytestmark = pytest.mark.usefixtures("one_thread")


def _lora(model, targets, seed):
    """A LoRA whose B is random (PEFT starts it at zero), as after training."""
    peft = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    """base → aligned (a merged rank-4 LoRA on q/k/v/o) → user's LoRA on q/v (saved adapter + merged model)."""
    root = tmp_path_factory.mktemp("safelora")
    base = tiny_llama(num_hidden_layers=3)
    base.save_pretrained(root / "base")
    aligned = _lora(base, ALIGN_TARGETS, seed=1).merge_and_unload()
    aligned.save_pretrained(root / "aligned")
    user = _lora(aligned, USER_TARGETS, seed=2)
    user.save_pretrained(root / "adapter")
    user.merge_and_unload().save_pretrained(root / "finetuned")
    return SimpleNamespace(
        root=root,
        base=load_file(root / "base" / "model.safetensors"),
        aligned=load_file(root / "aligned" / "model.safetensors"),
        finetuned=load_file(root / "finetuned" / "model.safetensors"),
        adapter=load_file(root / "adapter" / "adapter_model.safetensors"),
    )


def _ctx(
    root: Path,
    topology: str = "double",
    finetuned: str = "finetuned",
    adapter: str | None = "adapter",
    finetune_full: bool = False,
):
    adapter_config = AdapterConfig(topology=topology, finetune_full=finetune_full)
    adapter_config.finetune.target_modules = USER_TARGETS
    run = SimpleNamespace(
        model=SimpleNamespace(dtype="float32", trust_remote_code=False), adapter=adapter_config
    )
    return PostContext(
        run=run,
        key="post-test",
        base=ModelRef(str(root / "base")),
        aligned=ModelRef(str(root / "aligned")),
        finetuned=ModelRef(str(root / finetuned), adapter_dir=str(root / adapter) if adapter else None),
        tokenizer=None,
        plan=None,
        work_dir=root,
    )


def _user_modules() -> list[str]:
    return [f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in USER_TARGETS]


def _hand_update(models, module: str) -> torch.Tensor:
    """scaling · B·A read straight from the saved adapter file."""
    key = f"base_model.model.{module}"
    return USER_SCALING * models.adapter[f"{key}.lora_B.weight"] @ models.adapter[f"{key}.lora_A.weight"]


def _hand_c(models, module: str) -> torch.Tensor:
    v = models.aligned[f"{module}.weight"] - models.base[f"{module}.weight"]
    return v @ v.T / torch.sqrt((v**2).sum())  # paper Eq. 1, C formed explicitly


def _hand_similarity(models, module: str) -> float:
    delta = _hand_update(models, module)
    cdelta = _hand_c(models, module) @ delta
    return float((cdelta * delta).sum() / (cdelta.norm() * delta.norm()))


def _repair(models, **cfg):
    model, report = SafeLora(SafeLoraConfig(**cfg)).repair(_ctx(models.root))
    return {k: v.detach() for k, v in model.state_dict().items()}, report


# --- the projection ------------------------------------------------------------------------------------------------


def test_exact_projection_is_idempotent_and_is_the_pseudoinverse_projector():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g)  # rank 3: VᵀV is singular
    delta = torch.randn(12, 10, generator=g)
    once = projected_update(delta, v, "exact")
    assert torch.allclose(projected_update(once, v, "exact"), once, atol=1e-5)
    assert torch.allclose(once, v @ torch.linalg.pinv(v) @ delta, atol=1e-5)
    assert not torch.allclose(once, delta, atol=1e-2), "a rank-3 subspace must change a random update"


def test_approx_projection_is_the_papers_c_and_is_not_idempotent():
    g = torch.Generator().manual_seed(1)
    v, delta = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    c = v @ v.T / torch.linalg.norm(v)  # Frobenius norm of the matrix
    approx = projected_update(delta, v, "approx")
    assert torch.allclose(approx, c @ delta, atol=1e-5)
    # C² = C only when V's singular values are all ‖V‖_F; for a generic V the paper's C is not a projector.
    assert not torch.allclose(projected_update(approx, v, "approx"), approx, atol=1e-3)


# --- the repair on saved models --------------------------------------------------------------------------------------


def test_threshold_mode_projects_the_dissimilar_layers_and_leaves_the_rest_bit_identical(models):
    modules = _user_modules()
    similarity = {m: _hand_similarity(models, m) for m in modules}
    ranked = sorted(similarity.values())
    tau = (ranked[2] + ranked[3]) / 2  # 3 of the 6 layers below τ, away from rounding at the boundary
    weights, report = _repair(models, select_layers_type="threshold", threshold=tau)

    assert [r["module"] for r in report["per_layer"]] == modules
    for row in report["per_layer"]:
        assert row["similarity"] == pytest.approx(similarity[row["module"]], abs=1e-5)
        assert row["projected"] == (similarity[row["module"]] <= tau)
    assert report["projected"] == 3 and report["update"] == "adapter scaling·B·A"

    for name, tensor in models.finetuned.items():
        module = name.removesuffix(".weight")
        if module in modules and similarity[module] <= tau:
            expected = models.aligned[name] + _hand_c(models, module) @ _hand_update(models, module)
            assert torch.allclose(weights[name], expected, atol=1e-5), name
            assert not torch.allclose(weights[name], tensor, atol=1e-4), f"{name} should have changed"
        else:
            assert torch.equal(weights[name], tensor), f"{name} must be F's weight, bit for bit"


def test_number_mode_projects_the_k_least_similar_layers(models):
    similarity = {m: _hand_similarity(models, m) for m in _user_modules()}
    least = set(sorted(similarity, key=similarity.get)[:2])
    weights, report = _repair(models, select_layers_type="number", num_proj_layers=2)
    assert {r["module"] for r in report["per_layer"] if r["projected"]} == least
    for module in similarity:
        name = f"{module}.weight"
        assert torch.equal(weights[name], models.finetuned[name]) != (module in least), name


def test_exact_projection_keeps_an_update_inside_the_alignment_subspace(models):
    # The alignment LoRA changed q by B₁A₁, so V's column space is col(B₁): the exact projector keeps the
    # component of ΔW in col(B₁) and drops the rest.
    module = "model.layers.1.self_attn.q_proj"
    weights, report = _repair(models, select_layers_type="number", num_proj_layers=6, projection="exact")
    assert report["projected"] == 6
    v = models.aligned[f"{module}.weight"] - models.base[f"{module}.weight"]
    expected = models.aligned[f"{module}.weight"] + v @ torch.linalg.pinv(v) @ _hand_update(models, module)
    assert torch.allclose(weights[f"{module}.weight"], expected, atol=1e-5)


@pytest.mark.parametrize(
    "topology, finetune_full", [("full", False), ("double", True)], ids=["full", "full-parameter-attacker"]
)
def test_full_topology_projects_the_merged_difference(models, tmp_path, topology, finetune_full):
    # A full fine-tune: F = A + a dense change on every weight; SafeLoRA looks at q/v only.
    for name in ("base", "aligned"):
        (tmp_path / name).symlink_to(models.root / name)
    full = LlamaForCausalLM.from_pretrained(models.root / "aligned")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    full.save_pretrained(tmp_path / "full")
    tuned = load_file(tmp_path / "full" / "model.safetensors")

    model, report = SafeLora(SafeLoraConfig(select_layers_type="number", num_proj_layers=1)).repair(
        _ctx(tmp_path, topology=topology, finetuned="full", adapter=None, finetune_full=finetune_full)
    )
    weights = model.state_dict()
    assert report["update"] == "W_finetuned − W_aligned" and report["layers"] == 6
    sims = {}
    for module in _user_modules():
        w = f"{module}.weight"
        delta = tuned[w] - models.aligned[w]
        cdelta = _hand_c(models, module) @ delta
        sims[module] = float((cdelta * delta).sum() / (cdelta.norm() * delta.norm()))
    worst = min(sims, key=sims.get)
    for name, tensor in tuned.items():
        if name == f"{worst}.weight":
            expected = models.aligned[name] + _hand_c(models, worst) @ (tensor - models.aligned[name])
            assert torch.allclose(weights[name], expected, atol=1e-5)
        else:
            assert torch.equal(weights[name], tensor), name


def test_single_topology_projects_the_users_change_not_the_continued_alignment_lora(models, tmp_path):
    # Single topology: the user keeps training the alignment LoRA on the base model, so its B·A = V + the user's
    # change. SafeLoRA must project W_F − W_A (the user's change), on the alignment LoRA's modules.
    (tmp_path / "base").symlink_to(models.root / "base")
    torch.manual_seed(5)
    aligned = _lora(LlamaForCausalLM.from_pretrained(models.root / "base"), ALIGN_TARGETS, seed=6)
    aligned.save_pretrained(tmp_path / "align_adapter")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)  # the user's training of the same LoRA
        aligned.save_pretrained(tmp_path / "adapter")
        ft = aligned.merge_and_unload()
    ft.save_pretrained(tmp_path / "finetuned")
    # the aligned model = base + the alignment LoRA as saved before the user's steps
    from peft import PeftModel

    first = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(models.root / "base"), tmp_path / "align_adapter"
    )
    first.merge_and_unload().save_pretrained(tmp_path / "aligned")
    a = load_file(tmp_path / "aligned" / "model.safetensors")
    f = load_file(tmp_path / "finetuned" / "model.safetensors")

    model, report = SafeLora(SafeLoraConfig(select_layers_type="number", num_proj_layers=12)).repair(
        _ctx(tmp_path, topology="single")
    )
    weights = model.state_dict()
    assert (
        report["layers"] == 12 and report["projected"] == 12 and report["update"] == "W_finetuned − W_aligned"
    )
    for module in [f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in ALIGN_TARGETS]:
        w = f"{module}.weight"
        v = a[w] - models.base[w]
        expected = a[w] + v @ v.T / torch.linalg.norm(v) @ (f[w] - a[w])
        assert torch.allclose(weights[w], expected, atol=1e-5), w
    assert torch.equal(weights["model.layers.0.mlp.up_proj.weight"], f["model.layers.0.mlp.up_proj.weight"])


def test_modules_the_alignment_never_changed_are_refused(models):
    # The aligned LoRA did not touch the MLPs: there is no subspace to project onto (the original divides 0 by 0
    # and silently leaves such a module unprojected).
    cfg = SafeLoraConfig(target_modules=["q_proj"])
    SafeLora(cfg).repair(_ctx(models.root))  # a subset of the user's LoRA modules is fine
    ctx = _ctx(models.root, topology="full", finetuned="finetuned", adapter=None)
    with pytest.raises(FtguardError, match="did not change.*up_proj"):
        SafeLora(SafeLoraConfig(target_modules=["up_proj"])).repair(ctx)
    with pytest.raises(FtguardError, match="match none"):
        SafeLora(SafeLoraConfig(target_modules=["up_proj"])).repair(_ctx(models.root))


# --- config ----------------------------------------------------------------------------------------------------------


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="threshold"):
        SafeLoraConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="num_proj_layers"):
        SafeLoraConfig(num_proj_layers=0)
    with pytest.raises(ConfigError, match="post.args.treshold"):
        SafeLora.parse_args({"treshold": 0.3}, prefix="post.args")
    with pytest.raises(ConfigError, match="post.args.select_layers_type"):
        SafeLora.parse_args({"select_layers_type": "top"}, prefix="post.args")
    assert SafeLoraConfig() == SafeLoraConfig(select_layers_type="number", threshold=0.5, num_proj_layers=10)


def test_a_run_without_alignment_is_refused():
    from ftguard.config import load_config

    with pytest.raises(ConfigError, match="align"):
        load_config("quickstart-tiny", ["post.method=safelora", "align=null"])


@pytest.mark.slow
def test_pipeline_runs_safelora_end_to_end(tmp_path):
    from ftguard import cli

    # the packaged config: quickstart-tiny + post: {method: safelora, args: {num_proj_layers: 3}}
    args = [
        "--output-dir",
        str(tmp_path),
        "--set",
        "evaluate.points=[post]",
        "--set",
        "evaluate.harmful_prompts.n=4",
        "--set",
        "evaluate.task_n=4",
        "--set",
        "evaluate.over_refusal_prompts.n=4",
        "--set",
        "post.validation_n=4",
    ]
    assert cli.main(["run", "safelora-tiny", *args]) == 0
    manifest = json.loads((tmp_path / "post" / "COMPLETE.json").read_text())
    report = manifest["report"]
    assert manifest["method"] == "safelora" and report["layers"] == 8 and report["projected"] == 3
    tuned = load_file(next((tmp_path / "finetune" / "model").glob("*.safetensors")))
    repaired = load_file(next((tmp_path / "post" / "model").glob("*.safetensors")))
    changed = {k.removesuffix(".weight") for k in tuned if not torch.equal(tuned[k], repaired[k])}
    assert changed == {r["module"] for r in report["per_layer"] if r["projected"]}
    results = json.loads((tmp_path / "results.json").read_text())
    assert "harmful_score" in results["stages"]["post"]
