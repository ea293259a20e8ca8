"""T-Vaccine (docs/methods.md, T-Vaccine) against independent computations on a tiny random Llama: the layer
scores, the sampling distribution, the perturbed step restricted to the drawn layers, and the freezing."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

import ftguard.methods.tvaccine as tvaccine
from ftguard.errors import FtguardError
from ftguard.methods.tvaccine import (
    TVaccine,
    TVaccineConfig,
    TVaccineTrainer,
    layer_probabilities,
    sample_layers,
)
from ftguard.methods.vaccine import VaccineConfig
from ftguard.schema import ConfigError
from test_vaccine import _batch, _layers, _model
from test_vaccine import _trainer as vaccine_trainer
from tiny import tiny_peft_llama, tiny_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _harmful_rows(n=3, t=7, seed=9):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 64, (t,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * t, "labels": [-100] * 3 + ids[3:]})
    return rows


def _trainer(tmp_path, model, config, ga=1, **kwargs):
    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]}] * 6
    return tiny_trainer(
        TVaccineTrainer,
        tmp_path,
        model,
        rows,
        method_config=config,
        aux={"harmful": _harmful_rows()},
        per_device_train_batch_size=3,
        gradient_accumulation_steps=ga,
        max_steps=2,
        seed=5,
        **kwargs,
    )


def _grads(model):
    """Every trainable weight's gradient, None where it got none."""
    return {
        n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


def _layer(name):
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


def _attention_norms(model, batch):
    """‖∂loss/∂(attention output l)‖ by retain_grad and a plain backward."""
    kept = []
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, o: kept.append(o[0]) or o[0].retain_grad())
        for layer in _layers(model)
    ]
    model(**batch).loss.backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return torch.stack([h.grad.norm() for h in kept])


def _reference(model, batch, rho, chosen):
    """Independent T-Vaccine update: g on the chosen attention outputs, ε = ρ·g/(‖g‖ + 1e-7) over those layers
    only, then the gradient of the model with ε added to those outputs. Returns (weight grads, loss, ε)."""
    attn = [layer.self_attn for layer in _layers(model)]
    kept = {}

    def keep(i):
        return lambda m, a, o: kept.__setitem__(i, o[0]) or o[0].retain_grad()

    hooks = [attn[i].register_forward_hook(keep(i)) for i in chosen]
    model(**batch).loss.backward()
    for h in hooks:
        h.remove()
    norm = torch.sqrt(sum(kept[i].grad.pow(2).sum() for i in chosen))
    eps = {i: rho * kept[i].grad / (norm + 1e-7) for i in chosen}
    model.zero_grad(set_to_none=True)
    hooks = [attn[i].register_forward_hook(lambda m, a, o, e=eps[i]: (o[0] + e, *o[1:])) for i in chosen]
    loss = model(**batch).loss
    loss.backward()
    for h in hooks:
        h.remove()
    return _grads(model), loss.detach(), eps


def _set_probabilities(probs, k):
    """Exact probability of each k-set under successive sampling ∝ p without replacement (sum over orders)."""
    out = {}
    for order in itertools.permutations(range(len(probs)), k):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= probs[i] / left
            left -= probs[i]
        key = tuple(sorted(order))
        out[key] = out.get(key, 0.0) + prob
    return out


# ----------------------------------------------------------------------- layer scores and the draw


def test_scores_are_the_harmful_gradient_norms_of_the_attention_outputs(tmp_path):
    model = _model(layers=4)
    trainer = _trainer(tmp_path, model, TVaccineConfig(n_layers=2, harmful_batch_size=3))
    trainer.choose_layers(model, 0)
    harmful = {
        k: torch.tensor([r[k] for r in _harmful_rows()]) for k in ("input_ids", "attention_mask", "labels")
    }
    norms = _attention_norms(copy.deepcopy(model), harmful)
    assert torch.allclose(trainer.probabilities, (norms / norms.sum()).double(), atol=1e-6)
    assert trainer.probabilities.sum().item() == pytest.approx(1.0)
    # p ∝ the norm itself, of the harmful batch: neither its square nor the alignment batch's norms
    assert not torch.allclose(trainer.probabilities, (norms**2 / (norms**2).sum()).double(), atol=1e-3)
    aligned = _attention_norms(copy.deepcopy(model), _batch())
    assert not torch.allclose(trainer.probabilities, (aligned / aligned.sum()).double(), atol=1e-3)


@pytest.mark.parametrize(
    ("probs", "k"), [([0.1, 0.2, 0.3, 0.4], 1), ([0.1, 0.2, 0.3, 0.4], 2), ([0.05, 0.1, 0.15, 0.3, 0.4], 3)]
)
def test_draw_frequencies_match_successive_sampling_without_replacement(probs, k):
    exact = _set_probabilities(probs, k)
    assert sum(exact.values()) == pytest.approx(1.0)
    n = 20000
    generator = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, ...], int] = {}
    p = torch.tensor(probs, dtype=torch.float64)
    for _ in range(n):
        drawn = sample_layers(p, k, generator)
        assert drawn == sorted(set(drawn)) and len(drawn) == k
        counts[tuple(drawn)] = counts.get(tuple(drawn), 0) + 1
    assert set(counts) <= set(exact)
    for subset, prob in exact.items():
        sigma = math.sqrt(prob * (1 - prob) / n)
        assert abs(counts.get(subset, 0) / n - prob) < 5 * sigma + 1e-9, (
            subset,
            counts.get(subset, 0) / n,
            prob,
        )


def test_degenerate_scores_fall_back_to_uniform_draws():
    assert torch.equal(layer_probabilities(torch.zeros(4)), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(FtguardError, match="not finite"):
        layer_probabilities(torch.tensor([1.0, float("nan")]))
    generator = torch.Generator().manual_seed(1)
    p = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    seen = set()
    for _ in range(200):
        drawn = sample_layers(p, 3, generator)
        assert 1 in drawn and len(set(drawn)) == 3
        seen.add(tuple(drawn))
    assert len(seen) == 3, "the zero-score layers are filled in uniformly"
    assert sample_layers(torch.full((3,), 1 / 3, dtype=torch.float64), 3, generator) == [0, 1, 2]


def test_scores_every_k_steps_and_draws_every_j_once_per_optimizer_step(tmp_path, monkeypatch):
    model = _model(layers=4)
    trainer = _trainer(tmp_path, model, TVaccineConfig(n_layers=2, score_interval=3, sample_interval=2))
    harmful_draws, layer_draws = [], []
    aux, sample = trainer.aux_batch, tvaccine.sample_layers
    monkeypatch.setattr(trainer, "aux_batch", lambda *a: harmful_draws.append(a) or aux(*a))
    monkeypatch.setattr(
        tvaccine, "sample_layers", lambda *a: layer_draws.append(a[2].initial_seed()) or sample(*a)
    )
    seen = []
    for step in range(7):
        for _ in range(2):  # two micro-batches of one optimizer step
            trainer.choose_layers(model, step)
        seen.append((trainer.scored_at, trainer.chosen_at))
    assert seen == [(0, 0), (0, 0), (0, 2), (3, 2), (3, 4), (3, 4), (6, 6)]
    assert harmful_draws == [("harmful", 1)] * 3
    assert layer_draws == [5 * tvaccine.SEED_STRIDE + s for s in (0, 2, 4, 6)]


def test_method_state_resumes_the_draw_and_a_bare_resume_redraws(tmp_path, monkeypatch):
    model = _model(layers=4)
    cfg = TVaccineConfig(n_layers=2)
    first = _trainer(tmp_path, model, cfg)
    first.choose_layers(model, 0)
    values, tensors = first.method_state()
    json.dumps(values)
    resumed = _trainer(tmp_path, model, cfg)
    resumed.load_method_state(values, tensors)
    monkeypatch.setattr(resumed, "aux_batch", lambda *a: pytest.fail("a resumed run must not re-score"))
    assert resumed.choose_layers(model, 7) == first.chosen
    assert torch.equal(resumed.probabilities, first.probabilities)
    bare = _trainer(tmp_path, model, cfg)
    bare.choose_layers(model, 7)
    assert (bare.scored_at, bare.chosen_at) == (7, 7)


# ----------------------------------------------------------------------- the step


def test_step_is_the_gradient_of_the_model_perturbed_on_the_chosen_layers_only(tmp_path, monkeypatch):
    model, batch, rho = _model(layers=4), _batch(), 2.5
    trainer = _trainer(tmp_path, model, TVaccineConfig(rho=rho, n_layers=2))
    trainer.choose_layers(model, 0)
    trainer.chosen = chosen = [1, 3]  # pinned: an unchosen layer below and one between
    ref_grads, ref_loss, ref_eps = _reference(copy.deepcopy(model), batch, rho, chosen)
    applied = []
    real = tvaccine.add_to_outputs
    monkeypatch.setattr(
        tvaccine, "add_to_outputs", lambda mods, ts: applied.append((list(mods), list(ts))) or real(mods, ts)
    )
    loss = trainer.training_step(model, batch)

    (modules, eps), *more = applied
    assert not more and modules == [_layers(model)[i].self_attn for i in chosen], "only the chosen layers"
    assert torch.sqrt(sum(e.pow(2).sum() for e in eps)).item() == pytest.approx(rho, abs=1e-5)
    for i, e in zip(chosen, eps, strict=True):
        assert torch.allclose(e, ref_eps[i], atol=1e-7)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        if _layer(name) in chosen:
            assert torch.allclose(grad, ref_grads[name], atol=1e-6, rtol=1e-5), name
        else:
            assert grad is None, f"{name} is frozen: no gradient"
    assert trainer._recorded["tvaccine_perturbation_norm"][0] == pytest.approx(rho, abs=1e-5)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora" in n), "restored after the step"


def test_frozen_weights_do_not_move_while_the_chosen_ones_do(tmp_path):
    model = _model(layers=4)
    trainer = _trainer(
        tmp_path, model, TVaccineConfig(n_layers=2, sample_interval=100), weight_decay=0.1, learning_rate=1e-2
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()  # two optimizer steps with AdamW, decay and clipping, the same two layers
    chosen = trainer.chosen
    assert len(chosen) == 2
    for name, p in model.named_parameters():
        if name in before:
            moved = not torch.equal(p.detach(), before[name])
            assert moved == (_layer(name) in chosen), name
            assert p.requires_grad
            assert bool(trainer.optimizer.state.get(p)) == (_layer(name) in chosen), f"{name}: AdamW state"


@pytest.mark.parametrize("freeze", ["attention", "layer"])
def test_freeze_scope_attention_modules_or_whole_layers(tmp_path, freeze):
    model = tiny_peft_llama(("q_proj", "v_proj", "up_proj"), fresh=False, num_hidden_layers=3).float()
    trainer = _trainer(tmp_path, model, TVaccineConfig(n_layers=1, freeze=freeze))
    trainer.choose_layers(model, 0)
    trainer.chosen = [1]
    trainer.training_step(model, _batch())
    for name, grad in _grads(model).items():
        frozen = _layer(name) != 1 and ("self_attn" in name or freeze == "layer")
        assert (grad is None) == frozen, name
        assert frozen or grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    model, batch = _model(layers=4), _batch()
    plain = copy.deepcopy(model)
    model.train()
    model.activation_checkpointing_enable()
    results = []
    for m in (plain, model):
        trainer = _trainer(tmp_path, m, TVaccineConfig(n_layers=2))
        trainer.choose_layers(m, 0)
        trainer.chosen = [0, 2]
        trainer.training_step(m, batch)
        results.append(_grads(m))
    for name, grad in results[1].items():
        ref = results[0][name]
        assert (grad is None) == (ref is None) and (grad is None or torch.allclose(grad, ref, atol=1e-6)), (
            name
        )


def test_every_layer_chosen_is_exactly_vaccine(tmp_path):
    model, batch = _model(layers=3), _batch()
    vmodel = copy.deepcopy(model)
    vaccine_trainer(tmp_path, vmodel, VaccineConfig(rho=3.0)).training_step(vmodel, batch)
    trainer = _trainer(tmp_path, model, TVaccineConfig(rho=3.0, n_layers=3))
    trainer.training_step(model, batch)
    assert trainer.chosen == [0, 1, 2]
    ours, theirs = _grads(model), _grads(vmodel)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_gradient_accumulation_equals_the_mean_of_single_steps(tmp_path):
    model, b1, b2 = _model(layers=4), _batch(seed=1), _batch(seed=2)
    cfg = TVaccineConfig(n_layers=2)
    singles = []
    for b in (b1, b2):
        m = copy.deepcopy(model)
        single = _trainer(tmp_path, m, cfg)
        single.training_step(m, b)
        singles.append(_grads(m))
    trainer = _trainer(tmp_path, model, cfg, ga=2)
    for b in (b1, b2):
        trainer.training_step(model, b)
    assert trainer.chosen == single.chosen
    assert len(trainer._recorded["tvaccine_harmful_loss"]) == 1, "scored once per optimizer step"
    for name, grad in _grads(model).items():
        if singles[0][name] is None:
            assert grad is None, name
        else:
            assert torch.allclose(grad, (singles[0][name] + singles[1][name]) / 2, atol=1e-6), name


# ----------------------------------------------------------------------- config and data


def test_config_defaults_and_validation_name_the_key():
    assert TVaccine.parse_args(None) == TVaccineConfig(
        rho=3.0, n_layers=8, sample_interval=20, score_interval=200, harmful_n=200, harmful_batch_size=1
    )
    for key, value in [
        ("rho", -1),
        ("n_layers", 0),
        ("sample_interval", 0),
        ("score_interval", 0),
        ("harmful_n", 0),
        ("harmful_batch_size", 0),
        ("freeze", "mlp"),
        ("attention_modules", []),
    ]:
        with pytest.raises(ConfigError, match=rf"'align\.args\.{key}'"):
            TVaccine.parse_args({key: value}, prefix="align.args")


def test_more_layers_than_the_model_has_is_an_error(tmp_path):
    model = _model(layers=2)
    trainer = _trainer(tmp_path, model, TVaccineConfig(n_layers=3))
    with pytest.raises(FtguardError, match="n_layers = 3 but the model has 2 attention layers"):
        trainer.training_step(model, _batch())


def test_harmful_pool_is_the_first_n_alignment_harmful_answers():
    method = TVaccine(TVaccineConfig(harmful_n=2))
    plan = SimpleNamespace(alignment_harmful=["h0", "h1", "h2"])
    assert method.extra_datasets(SimpleNamespace(plan=plan, tokenize=list)) == {"harmful": ["h0", "h1"]}
    assert method.train_examples([], plan)[1] == {"harmful_pool": "alignment_harmful", "harmful_pool_size": 2}
    with pytest.raises(FtguardError, match="alignment_harmful"):
        method.extra_datasets(SimpleNamespace(plan=SimpleNamespace(alignment_harmful=[]), tokenize=list))
