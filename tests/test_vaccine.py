"""Vaccine and RandomVaccine (docs/methods.md, Vaccine and RandomVaccine) against independent computations on
a tiny random Llama."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import ftguard.methods.vaccine as vaccine
from ftguard.errors import FtguardError
from ftguard.methods.vaccine import RandomVaccineTrainer, VaccineConfig, VaccineTrainer
from ftguard.schema import ConfigError
from ftguard.training.hooks import add_to_outputs
from ftguard.training.trainer import FtguardTrainer
from tiny import tiny_llama, tiny_peft_llama, tiny_trainer

H = 16


def _model(layers=2, lora=True, seed=0):
    shape = {"hidden_size": H, "num_hidden_layers": layers}
    if not lora:
        return tiny_llama(seed=seed, **shape).float()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    return tiny_peft_llama(targets, fresh=False, seed=seed, **shape).float()


def _layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def _batch(seed=1, b=3, t=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -3:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trainer(tmp_path, model, config, cls=VaccineTrainer, ga=1, **kwargs):
    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]}] * 6
    return tiny_trainer(
        cls,
        tmp_path,
        model,
        rows,
        method_config=config,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=ga,
        max_steps=2,
        seed=5,
        **kwargs,
    )


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference(model, batch, rho, layers=None):
    """Independent Vaccine step: retain_grad on the attention outputs (plain backward), ε, then the perturbed
    model's loss gradient. Returns (weight grads, perturbed loss, activation grads, ε)."""
    attn = [layer.self_attn for layer in _layers(model)]
    kept = []
    handles = [m.register_forward_hook(lambda m, a, o: kept.append(o[0]) or o[0].retain_grad()) for m in attn]
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    g = [h.grad.detach().clone() for h in kept]
    layers = list(range(len(attn))) if layers is None else layers
    norm = torch.sqrt(sum(g[i].pow(2).sum() for i in layers))
    eps = {i: rho * g[i] / (norm + 1e-7) for i in layers}
    model.zero_grad(set_to_none=True)
    handles = [attn[i].register_forward_hook(lambda m, a, o, e=e: (o[0] + e, *o[1:])) for i, e in eps.items()]
    loss = model(**batch).loss
    loss.backward()
    for h in handles:
        h.remove()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return grads, loss.detach(), g, eps


def _assert_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-5), k


def test_perturbation_has_norm_rho_and_follows_the_activation_gradient(tmp_path):
    model, batch = _model(layers=3), _batch()
    trainer = _trainer(tmp_path, model, VaccineConfig(rho=2.0))
    _, _, ref_g, ref_eps = _reference(copy.deepcopy(model), batch, 2.0)

    loss, grads = trainer.attention_gradients(model, batch)
    assert all(p.grad is None for p in model.parameters()), "the first pass leaves no weight gradient"
    for g, r in zip(grads, ref_g, strict=True):
        assert torch.allclose(g, r, atol=1e-7)
    chosen, eps, grad_norm = trainer.perturbation(grads)
    assert chosen == [0, 1, 2]
    assert torch.allclose(grad_norm, torch.sqrt(sum(r.pow(2).sum() for r in ref_g)))
    total = torch.sqrt(sum(e.pow(2).sum() for e in eps))
    assert abs(total.item() - 2.0) < 1e-5, "one global norm over all layers, examples and positions"
    for i, e in enumerate(eps):
        assert torch.allclose(e, ref_eps[i], atol=1e-7)
        # proportional to g_l with the same factor for every layer
        assert torch.allclose(e, ref_g[i] * (2.0 / grad_norm), atol=1e-6)


@pytest.mark.parametrize("rho", [0.5, 2.0, 5.0])
def test_step_gradient_is_the_gradient_of_the_perturbed_model(tmp_path, rho):
    model, batch = _model(), _batch()
    ref_grads, ref_loss, _, _ = _reference(copy.deepcopy(model), batch, rho)
    trainer = _trainer(tmp_path, model, VaccineConfig(rho=rho))
    loss = trainer.training_step(model, batch)
    assert torch.allclose(loss, ref_loss, atol=1e-6), "the step returns the perturbed loss"
    _assert_close(_grads(model), ref_grads)
    recorded = trainer._recorded
    assert recorded["vaccine_perturbation_norm"][0] == pytest.approx(rho, abs=1e-5)
    assert recorded["vaccine_perturbed_loss"][0] == pytest.approx(ref_loss.item(), abs=1e-6)
    assert recorded["vaccine_clean_loss"][0] != pytest.approx(ref_loss.item(), abs=1e-6)


def test_rho_zero_gives_exactly_the_sft_gradient(tmp_path):
    model, batch = _model(), _batch()
    sft_model = copy.deepcopy(model)
    sft = _trainer(tmp_path, sft_model, None, cls=FtguardTrainer)
    sft_loss = sft.training_step(sft_model, batch)
    trainer = _trainer(tmp_path, model, VaccineConfig(rho=0.0))
    loss = trainer.training_step(model, batch)
    assert torch.equal(loss, sft_loss)
    a, b = _grads(model), _grads(sft_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _count_passes(trainer, model, batch):
    counts = {"model_forward": 0, "attention_forward": 0, "backward_through_attention": 0, "weight_grad": 0}
    base = model.get_base_model()
    handles = [
        base.register_forward_pre_hook(
            lambda m, a: counts.__setitem__("model_forward", counts["model_forward"] + 1)
        )
    ]

    def on_attention(m, a, o):
        counts["attention_forward"] += 1
        if m is _layers(model)[-1].self_attn and o[0].requires_grad:
            o[0].register_hook(
                lambda g: counts.__setitem__(
                    "backward_through_attention", counts["backward_through_attention"] + 1
                )
            )

    handles += [layer.self_attn.register_forward_hook(on_attention) for layer in _layers(model)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    handles += [
        p.register_post_accumulate_grad_hook(
            lambda p: counts.__setitem__("weight_grad", counts["weight_grad"] + 1)
        )
        for p in trainable
    ]
    trainer.training_step(model, batch)
    for h in handles:
        h.remove()
    counts["weight_grad"] /= len(trainable)  # backward passes that accumulate into .grad
    return counts


def test_pass_counts(tmp_path):
    batch = _batch()
    model = _model()
    counts = _count_passes(_trainer(tmp_path, model, VaccineConfig()), model, batch)
    assert counts == {
        "model_forward": 2,
        "attention_forward": 4,
        "backward_through_attention": 2,
        "weight_grad": 1,
    }
    model = _model()
    counts = _count_passes(
        _trainer(tmp_path, model, vaccine.RandomVaccineConfig(), cls=RandomVaccineTrainer), model, batch
    )
    assert counts == {
        "model_forward": 1,
        "attention_forward": 2,
        "backward_through_attention": 1,
        "weight_grad": 1,
    }


def test_gradient_accumulation_equals_the_mean_of_single_steps(tmp_path):
    model, b1, b2 = _model(), _batch(seed=1), _batch(seed=2)
    singles = []
    for b in (b1, b2):
        m = copy.deepcopy(model)
        _trainer(tmp_path, m, VaccineConfig()).training_step(m, b)
        singles.append(_grads(m))
    trainer = _trainer(tmp_path, model, VaccineConfig(), ga=2)
    losses = [trainer.training_step(model, b) for b in (b1, b2)]
    _assert_close(_grads(model), {k: (singles[0][k] + singles[1][k]) / 2 for k in singles[0]})
    # logged terms are per-step quantities, comparable across accumulation settings
    assert trainer._recorded["vaccine_perturbation_norm"] == pytest.approx([2.0, 2.0], abs=1e-5)
    assert trainer._recorded["vaccine_perturbed_loss"] == pytest.approx([2 * loss.item() for loss in losses])


def test_topk_perturbs_only_the_layers_with_the_largest_gradient_norm(tmp_path):
    model, batch = _model(layers=4), _batch()
    _, _, ref_g, _ = _reference(copy.deepcopy(model), batch, 1.0)
    top = sorted(sorted(range(4), key=lambda i: -ref_g[i].norm().item())[:2])
    ref_grads, _, _, ref_eps = _reference(copy.deepcopy(model), batch, 3.0, layers=top)
    trainer = _trainer(tmp_path, model, VaccineConfig(rho=3.0, layers="topk", topk=2))
    chosen, eps, _ = trainer.perturbation(trainer.attention_gradients(model, batch)[1])
    assert chosen == top
    assert torch.sqrt(sum(e.pow(2).sum() for e in eps)).item() == pytest.approx(3.0, abs=1e-5)
    for i, e in zip(chosen, eps, strict=True):
        assert torch.allclose(e, ref_eps[i], atol=1e-7)
    trainer.training_step(model, batch)
    _assert_close(_grads(model), ref_grads)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    model, batch = _model(), _batch()
    ref_grads, _, _, _ = _reference(copy.deepcopy(model), batch, 2.0)
    model.train()
    model.activation_checkpointing_enable()
    trainer = _trainer(tmp_path, model, VaccineConfig())
    trainer.training_step(model, batch)
    _assert_close(_grads(model), ref_grads)
    # random_vaccine: the recomputation redraws the same noise (checkpoint restores the RNG state)
    plain, ckpt = _model(), _model()
    ckpt.train()
    ckpt.activation_checkpointing_enable()
    for m in (plain, ckpt):
        random_trainer = _trainer(tmp_path, m, vaccine.RandomVaccineConfig(), cls=RandomVaccineTrainer)
        torch.manual_seed(11)
        random_trainer.training_step(m, batch)
    _assert_close(_grads(ckpt), _grads(plain))


def test_reentrant_checkpointing_fails_with_a_clear_message(tmp_path):
    model = _model()
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": True})
    trainer = _trainer(tmp_path, model, VaccineConfig())
    with pytest.raises(FtguardError, match="use_reentrant"):
        trainer.training_step(model, _batch())


def test_random_vaccine_step_is_sft_on_noisy_attention_outputs(tmp_path):
    model, batch, rho = _model(), _batch(), 3.0
    ref = copy.deepcopy(model)
    trainer = _trainer(tmp_path, model, vaccine.RandomVaccineConfig(rho=rho), cls=RandomVaccineTrainer)
    torch.manual_seed(7)  # after the Trainer, which seeds the RNG itself
    loss = trainer.training_step(model, batch)
    # Independent: the same draws in layer order, std √ρ, added to each attention output.
    torch.manual_seed(7)
    noises = []

    def hook(m, a, o):
        noises.append(torch.randn(o[0].shape) * rho**0.5)
        return (o[0] + noises[-1], *o[1:])

    handles = [layer.self_attn.register_forward_hook(hook) for layer in _layers(ref)]
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    for h in handles:
        h.remove()
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    _assert_close(_grads(model), _grads(ref))
    assert trainer._recorded["random_vaccine_noise_norm"][0] == pytest.approx(
        torch.sqrt(sum(n.pow(2).sum() for n in noises)).item(), rel=1e-5
    )


def test_bf16_autocast_step_perturbs_by_exactly_rho(tmp_path):
    model, batch = _model(), _batch()
    trainer = _trainer(tmp_path, model, VaccineConfig(), bf16=True)
    # As Trainer.train does: accelerate wraps the forward in autocast (the Trainer adds none of its own).
    model = trainer.accelerator.prepare_model(model)
    modules = trainer.attention_modules(model)
    _, grads = trainer.attention_gradients(model, batch)
    assert all(g.dtype == torch.bfloat16 for g in grads), "the test must exercise bf16 activations"
    chosen, eps, _ = trainer.perturbation(grads)
    assert all(e.dtype == torch.float32 for e in eps)
    assert abs(torch.sqrt(sum(e.pow(2).sum() for e in eps)).item() - 2.0) < 1e-4
    # What reaches the residual stream: each attention output after the hook minus the same output before it (one
    # forward, so a layer's change is not mixed with the earlier layers' perturbations).
    raw, passed_on = [], []
    hooks = [m.register_forward_hook(lambda m, a, o: raw.append(o[0].detach())) for m in modules]
    with add_to_outputs(modules, eps), torch.no_grad():
        hooks += [m.register_forward_hook(lambda m, a, o: passed_on.append(o[0].detach())) for m in modules]
        model(**batch)
    for h in hooks:
        h.remove()
    assert all(o.dtype == torch.bfloat16 for o in raw) and all(o.dtype == torch.float32 for o in passed_on)
    applied = [(p - c.float()) for p, c in zip(passed_on, raw, strict=True)]
    assert abs(torch.sqrt(sum(a.pow(2).sum() for a in applied)).item() - 2.0) < 1e-4

    loss = trainer.training_step(model, batch)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in _grads(model).values())
    assert abs(trainer._recorded["vaccine_perturbation_norm"][0] - 2.0) < 1e-4


def test_config_validation_names_the_key():
    method = vaccine.Vaccine
    assert method.parse_args(None) == VaccineConfig(rho=2.0, attention_modules=None, layers="all", topk=None)
    with pytest.raises(ConfigError, match=r"'align\.args\.rho' must be"):
        method.parse_args({"rho": -1}, prefix="align.args")
    with pytest.raises(ConfigError, match=r"'align\.args\.topk'"):
        method.parse_args({"layers": "topk"}, prefix="align.args")
    with pytest.raises(ConfigError, match=r"'align\.args\.topk'"):
        method.parse_args({"topk": 2}, prefix="align.args")
    with pytest.raises(ConfigError, match=r"'align\.args\.layers'"):
        method.parse_args({"layers": "some"}, prefix="align.args")
    assert method.parse_args({"layers": "topk", "topk": 3, "attention_modules": ["LlamaAttention"]}).topk == 3
    with pytest.raises(ConfigError, match=r"'args\.rho'"):
        vaccine.RandomVaccine.parse_args({"rho": float("nan")})


def test_topk_larger_than_the_model_is_an_error(tmp_path):
    model = _model()
    trainer = _trainer(tmp_path, model, VaccineConfig(layers="topk", topk=3))
    with pytest.raises(FtguardError, match="topk = 3 but the model has 2 attention layers"):
        trainer.training_step(model, _batch())


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        pytest.param("vaccine", marks=pytest.mark.precision("fp32"), id="vaccine-fp32"),
        # ‖ε‖ = ρ must hold to 1e-4 where `auto` picks bf16 autocast (bf16 GPUs, AVX512-BF16/AMX CPUs) too.
        pytest.param("vaccine", marks=pytest.mark.precision("bf16"), id="vaccine-bf16"),
        "random_vaccine",
    ],
)
def test_pipeline_end_to_end(tmp_path, method):
    from ftguard.config import load_config
    from ftguard.pipeline.run import run_pipeline

    cfg = load_config(
        "quickstart-tiny",
        [
            f"align.method={method}",
            "evaluate.points=[]",
            "align.train.max_steps=3",
            "align.train.logging_steps=1",
            "finetune=null",
            f"output_dir={tmp_path}",
        ],
    )
    run_pipeline(cfg)
    log = json.loads((tmp_path / "align" / "train_log.json").read_text())
    steps = [e for e in log if "loss" in e]
    assert len(steps) == 3
    if method == "vaccine":
        assert all(e["vaccine_perturbation_norm"] == pytest.approx(2.0, abs=1e-4) for e in steps)
        assert all(e["vaccine_grad_norm"] > 0 for e in steps)
    else:
        assert all(e["random_vaccine_noise_norm"] > 0 for e in steps)
    manifest = json.loads((tmp_path / "align" / "COMPLETE.json").read_text())
    assert manifest["method"] == method
