"""AsFT (fine-tuning stage): the regulariser λ·Σ‖(I − C)·ΔW‖²_F and its gradient against a hand computation with
an explicit C (written-out rows, float64), λ = 0 as plain SFT, updates inside / orthogonal to the alignment
subspace, the topologies' ΔW, the base loaded from the run's model, and bad config values."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

import ftguard.methods.asft as asft
from ftguard.config import AdapterConfig
from ftguard.config import LoraConfig as FtguardLora
from ftguard.data.collate import CausalLMCollator
from ftguard.errors import FtguardError
from ftguard.resolve import load_run
from ftguard.schema import ConfigError, from_dict
from ftguard.training.trainer import FtguardTrainer
from tiny import SHAPE, tiny_llama, tiny_lora_llama, tiny_peft_llama, tiny_trainer, training_args

PAD = 0
VOCAB = SHAPE["vocab_size"]
LAYERS = range(SHAPE["num_hidden_layers"])
TARGETS = ("q_proj", "v_proj")
MODULES = [f"model.layers.{i}.self_attn.{m}" for i in LAYERS for m in TARGETS]

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 9 - 2 * (i % 3)
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * 3 + ids[3:]})
    return rows


def _batch(seed: int = 1):
    return CausalLMCollator(pad_token_id=PAD)(_rows(seed))


def _modules(model) -> dict:
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    return dict(plain.named_modules())


def _start_weight(module) -> torch.Tensor:
    """The module's effective weight now (base layer + scaling·B·A for a LoRA), float64."""
    if not hasattr(module, "lora_A"):
        return module.weight.detach().double().clone()
    b, a = module.lora_B["default"].weight.double(), module.lora_A["default"].weight.double()
    return module.base_layer.weight.detach().double() + module.scaling["default"] * (b @ a).detach()


def _directions(model, seed: int = 5, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """An alignment direction per module (float64, so that rank 2 is exact): rank 2 on q_proj (as a LoRA
    alignment), full rank on v_proj."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in MODULES:
        rows, cols = _modules(model)[name].base_layer.weight.shape
        if name.endswith("q_proj"):
            v = torch.randn(rows, 2, generator=g, dtype=torch.float64)
            v = v @ torch.randn(2, cols, generator=g, dtype=torch.float64)
        else:
            v = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        out[name] = v * scale
    return out


def _base_for(model, directions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base weights such that (start weight − base) is exactly the given direction."""
    modules = _modules(model)
    return {n: (_start_weight(modules[n]) - v).float() for n, v in directions.items()}


def _trainer(tmp_path, model, base, cls=None, ga: int = 1, **cfg):
    cls = cls or functools.partial(asft.AsftTrainer, base_weights=base)
    return tiny_trainer(
        cls,
        tmp_path,
        model,
        _rows(7, 6),
        collator=CausalLMCollator(pad_token_id=PAD),
        method_config=None if cls is FtguardTrainer else asft.AsftConfig(**cfg),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=ga,
        max_steps=2,
        seed=3,
    )


@torch.no_grad()
def _train_lora(model, seed: int = 9):
    """As if trained: every LoRA factor moved (B away from zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(trainer, model, batch):
    model.zero_grad(set_to_none=True)
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach(), _grads(model)


# ----------------------------------------------------------------------------- independent computation


def explicit_c(v: torch.Tensor, projection: str) -> torch.Tensor:
    """C as an [out, out] matrix: approx row by row, C[i, j] = Σ_k V[i,k]·V[j,k] / ‖V‖_F; exact = V·V⁺."""
    if projection == "exact":
        return v @ torch.linalg.pinv(v, rtol=1e-10)
    frobenius = sum(float(x) ** 2 for x in v.flatten()) ** 0.5
    c = torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64)
    for i in range(v.shape[0]):
        for j in range(v.shape[0]):
            c[i, j] = (v[i] * v[j]).sum() / frobenius
    return c


def penalty_by_hand(model, directions, lam, projection, start=None):
    """λ·Σ_modules Σ_entries ((I − C)·(BA − B₀A₀))² with float64 leaves, and its gradient per LoRA tensor."""
    leaves = {
        n: p.detach().double().clone().requires_grad_(True)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    total = torch.zeros((), dtype=torch.float64)
    for name, v in directions.items():
        a = leaves[f"base_model.model.{name}.lora_A.default.weight"]
        b = leaves[f"base_model.model.{name}.lora_B.default.weight"]
        delta = b @ a - (start[name] if start is not None else 0)
        residual = (torch.eye(v.shape[0], dtype=torch.float64) - explicit_c(v, projection)) @ delta
        for row in residual:
            total = total + (row * row).sum()
    value = lam * total
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return value.detach(), dict(zip(leaves, grads, strict=True))


# ----------------------------------------------------------------------------- the update rule


@pytest.mark.parametrize("projection", ["approx", "exact"])
def test_value_and_gradient_equal_a_hand_computation(tmp_path, projection):
    model = tiny_peft_llama(TARGETS)  # fresh: B₀ = 0, so ΔW = B·A
    directions = _directions(model)
    trainer = _trainer(tmp_path, model, _base_for(model, directions), lam=0.7, projection=projection)
    sft = _trainer(tmp_path, model, None, cls=FtguardTrainer)
    assert torch.equal(trainer.orthogonal().detach(), torch.zeros(()))  # nothing moved yet
    _train_lora(model)
    batch = _batch()

    loss, grads = _loss_and_grads(trainer, model, batch)
    ce, sft_grads = _loss_and_grads(sft, model, batch)
    value, hand = penalty_by_hand(model, directions, 0.7, projection)

    assert value > 1e-3
    torch.testing.assert_close(loss - ce, value.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(0.7 * trainer.orthogonal().detach(), value.float(), rtol=1e-5, atol=1e-6)
    assert set(grads) == set(hand) == set(sft_grads)
    for name in grads:
        torch.testing.assert_close(grads[name] - sft_grads[name], hand[name].float(), rtol=1e-4, atol=1e-6)


def test_lambda_zero_is_exactly_the_sft_step(tmp_path):
    model = tiny_peft_llama(TARGETS)
    base = _base_for(model, _directions(model))
    _train_lora(model)
    batch = _batch()
    loss, grads = _loss_and_grads(_trainer(tmp_path, model, base, lam=0.0), model, batch)
    sft_loss, sft_grads = _loss_and_grads(_trainer(tmp_path, model, None, cls=FtguardTrainer), model, batch)
    assert torch.equal(loss, sft_loss)
    assert grads.keys() == sft_grads.keys() and all(torch.equal(grads[n], sft_grads[n]) for n in grads)


def _one_module_update(model, trainer, name: str, b: torch.Tensor) -> torch.Tensor:
    """Set module ``name``'s LoRA to (b, random A) and every other LoRA to zero; return ‖ΔW‖² of that module."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
        module = _modules(model)[name]
        module.lora_B["default"].weight.copy_(b)
        a = module.lora_A["default"].weight
        return float(((b.double() @ a.double()) ** 2).sum())


def _rank_one(model, name: str, scale: float, seed: int):
    """Directions where module ``name``'s is scale·u·wᵀ, u and w unit vectors; returns them and u."""
    rows, cols = _modules(model)[name].base_layer.weight.shape
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, generator=g, dtype=torch.float64)
    w = torch.randn(cols, generator=g, dtype=torch.float64)
    u, w = u / u.norm(), w / w.norm()
    return {**_directions(model), name: scale * torch.outer(u, w)}, u


@pytest.mark.parametrize("projection", ["approx", "exact"])
def test_an_update_inside_the_alignment_subspace_is_free_and_an_orthogonal_one_is_not(tmp_path, projection):
    model = tiny_peft_llama(TARGETS)
    name = MODULES[0]
    # ‖V‖_F = 1 and rank 1: then the authors' C = VVᵀ/‖V‖_F = uuᵀ is the projector too.
    directions, u = _rank_one(model, name, 1.0, seed=11)
    trainer = _trainer(tmp_path, model, _base_for(model, directions), projection=projection)
    rows, r = _modules(model)[name].lora_B["default"].weight.shape
    g = torch.Generator().manual_seed(13)

    inside = torch.outer(u, torch.randn(r, generator=g, dtype=torch.float64)).float()  # columns along u
    size = _one_module_update(model, trainer, name, inside)
    assert size > 1e-3 and float(trainer.orthogonal()) < 1e-6 * size

    across = torch.randn(rows, r, generator=g, dtype=torch.float64)
    across = (across - torch.outer(u, u @ across)).float()  # columns orthogonal to u
    size = _one_module_update(model, trainer, name, across)
    assert size > 1e-3 and float(trainer.orthogonal()) == pytest.approx(size, rel=1e-5)


def test_the_authors_c_penalises_updates_inside_the_subspace_unless_its_scale_is_one(tmp_path):
    """approx: C = VVᵀ/‖V‖_F = 3·uuᵀ for V = 3·u·wᵀ, so (I − C)·u = −2u: an update along u costs 4·‖ΔW‖²; the
    exact projector leaves it free."""
    model = tiny_peft_llama(TARGETS)
    name = MODULES[0]
    directions, u = _rank_one(model, name, 3.0, seed=12)
    base = _base_for(model, directions)
    r = _modules(model)[name].lora_B["default"].weight.shape[1]
    inside = torch.outer(u, torch.randn(r, generator=torch.Generator().manual_seed(14), dtype=torch.float64))
    approx = _trainer(tmp_path, model, base, projection="approx")
    exact = _trainer(tmp_path, model, base, projection="exact")
    size = _one_module_update(model, approx, name, inside.float())
    assert float(approx.orthogonal()) == pytest.approx(4.0 * size, rel=1e-5)
    assert float(exact.orthogonal()) < 1e-6 * size


def test_a_module_the_alignment_never_changed_counts_its_whole_update(tmp_path, caplog):
    model = tiny_peft_llama(TARGETS)
    directions = _directions(model)
    directions[MODULES[1]] = torch.zeros_like(directions[MODULES[1]])
    with caplog.at_level(logging.WARNING, logger="ftguard.methods.asft"):
        trainer = _trainer(tmp_path, model, _base_for(model, directions), projection="approx")
    assert "did not change 1 of 4 modules" in caplog.text and MODULES[1] in caplog.text
    _train_lora(model)
    value, _ = penalty_by_hand(model, {MODULES[1]: directions[MODULES[1]]}, 1.0, "exact")  # C = 0: ‖ΔW‖²
    only = {MODULES[1]: trainer.anchors[MODULES[1]]}
    trainer.anchors = only
    assert float(trainer.orthogonal()) == pytest.approx(float(value), rel=1e-5)
    assert torch.isfinite(trainer.orthogonal())


def test_a_continued_lora_is_penalised_on_its_change_since_the_start(tmp_path):
    """single topology: the LoRA starts non-zero, so V includes scaling·B₀A₀ and ΔW = BA − B₀A₀."""
    model = tiny_lora_llama()  # random B: a trained (alignment) adapter
    modules = _modules(model)
    start = {
        n: (
            modules[n].lora_B["default"].weight.double() @ modules[n].lora_A["default"].weight.double()
        ).detach()
        for n in MODULES
    }
    directions = _directions(model, seed=6)
    trainer = _trainer(tmp_path, model, _base_for(model, directions), lam=1.0)
    assert abs(float(trainer.orthogonal())) < 1e-8
    _train_lora(model, seed=4)
    value, _ = penalty_by_hand(model, directions, 1.0, "approx", start=start)
    assert float(trainer.orthogonal()) == pytest.approx(float(value), rel=1e-5)


def test_full_fine_tuning_penalises_the_weight_change_of_the_target_modules(tmp_path):
    model = tiny_llama()
    names = [f"model.layers.{i}.self_attn.v_proj" for i in LAYERS]
    g = torch.Generator().manual_seed(8)
    directions = {
        n: torch.randn(_modules(model)[n].weight.shape, generator=g, dtype=torch.float64) for n in names
    }
    base = {n: (_modules(model)[n].weight.double() - v).float().detach() for n, v in directions.items()}
    start = {n: _modules(model)[n].weight.detach().double().clone() for n in names}
    trainer = _trainer(tmp_path, model, base)
    assert set(trainer.anchors) == set(names)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    expected = sum(
        float(
            (
                (
                    (torch.eye(v.shape[0], dtype=torch.float64) - explicit_c(v, "approx"))
                    @ (_modules(model)[n].weight.double() - start[n])
                )
                ** 2
            ).sum()
        )
        for n, v in directions.items()
    )
    assert float(trainer.orthogonal()) == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_gives_the_term_once_per_optimizer_step(tmp_path):
    model = tiny_peft_llama(TARGETS)
    trainer = _trainer(tmp_path, model, _base_for(model, _directions(model)), ga=2)
    _train_lora(model)
    model.train()
    batch = _batch()
    items = (batch["labels"][:, 1:] != -100).sum()
    # normalised over the window (num_items_in_batch given): the Trainer will not divide, so the term is halved
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        ce = FtguardTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=items)
    torch.testing.assert_close(loss - ce, trainer.orthogonal() / 2, rtol=1e-5, atol=1e-7)


def test_training_logs_the_penalty(tmp_path):
    model = tiny_peft_llama(TARGETS)
    trainer = _trainer(tmp_path, model, _base_for(model, _directions(model)))
    trainer.args.logging_steps = 1
    trainer.train()
    logged = [e for e in trainer.state.log_history if "asft_orthogonal" in e]
    assert len(logged) == 2 and logged[0]["asft_orthogonal"] == 0.0 and logged[1]["asft_orthogonal"] > 0


# ----------------------------------------------------------------------------- modules and the base model


def test_target_modules_restrict_the_lora_modules_and_unknown_ones_fail():
    model = tiny_peft_llama(TARGETS)
    assert list(asft.regularised_modules(model, None)) == MODULES
    assert list(asft.regularised_modules(model, ["v_proj"])) == [n for n in MODULES if n.endswith("v_proj")]
    with pytest.raises(FtguardError, match="match no LoRA-adapted module"):
        asft.regularised_modules(model, ["up_proj"])
    with pytest.raises(FtguardError, match="target_modules must name modules"):
        asft.regularised_modules(tiny_llama(), None)


def _ctx(model, name: str):
    run = SimpleNamespace(
        model=SimpleNamespace(name=name, dtype="float32", trust_remote_code=False, revision=None),
        adapter=AdapterConfig(finetune=FtguardLora(target_modules=list(TARGETS))),
    )
    return SimpleNamespace(run=run, model=model, plan=None, stage="finetune")


@pytest.mark.parametrize("via", ["model.name", "base_model"])
def test_the_trainer_reads_the_base_from_the_runs_model_or_base_model(tmp_path, via):
    """V = the stage's model (the merged aligned model) − the model before alignment, read from disk."""
    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    aligned = tiny_peft_llama(
        ("q_proj", "k_proj", "v_proj", "o_proj"), fresh=False, seed=0
    ).merge_and_unload()
    modules = dict(aligned.named_modules())
    v = {
        n: modules[n].weight.detach().double() - dict(base.named_modules())[n].weight.double()
        for n in MODULES
    }
    model = get_peft_model(aligned, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
    folder = str(tmp_path / "base")
    method = asft.Asft(asft.AsftConfig(base_model=folder if via == "base_model" else None))
    ctx = _ctx(model, folder if via == "model.name" else str(tmp_path / "no-such-model"))
    trainer = method.create_trainer(ctx, model=model, args=training_args(tmp_path / "out"))
    assert list(trainer.anchors) == MODULES
    for n in MODULES:
        assert v[n].abs().max() > 1e-3
        f = trainer.anchors[n].factor.double()
        torch.testing.assert_close(f @ f.T, explicit_c(v[n], "approx"), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"lam": -1.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"projection": "pca"}, "projection"),
        ({"base_model": ""}, "base_model"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "q_proj"}, "target_modules"),
        ({"target_modules": [""]}, "target_modules"),
        ({"lambda_reg": 1}, "lambda_reg"),
    ],
)
def test_bad_config_values_fail_by_name(args, key):
    with pytest.raises(ConfigError) as exc:
        from_dict(asft.AsftConfig, args, prefix="finetune.args")
    assert f"finetune.args.{key}" in str(exc.value) and "\n" not in str(exc.value)


def test_defaults_are_the_authors():
    cfg = asft.AsftConfig()
    assert (cfg.lam, cfg.projection, cfg.base_model, cfg.target_modules) == (1.0, "approx", None, None)


def test_a_run_without_align_stage_needs_a_base_model():
    overrides = ["align=null", "evaluate.points=[base,finetune]"]
    with pytest.raises(ConfigError, match="'finetune.args.base_model' is required when align is null"):
        load_run("asft-tiny", overrides)
    assert (
        load_run("asft-tiny", [*overrides, "finetune.args.base_model=tiny"])
        .method("finetune")
        .config.base_model
    )
