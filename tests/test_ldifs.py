"""LDIFS (docs/methods.md, LDIFS): the loss and its gradient against a hand computation with a separate frozen
copy, zero at the start, pass counts, accumulation, the overflow error, resume, and the pipeline."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.func import functional_call

import ftguard.methods.ldifs as ld
from ftguard.data.collate import CausalLMCollator
from ftguard.errors import FtguardError
from ftguard.schema import ConfigError, from_dict
from ftguard.training.trainer import FtguardTrainer
from tiny import tiny_peft_llama, tiny_trainer

PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 9 - 2 * (i % 3)  # different lengths: the batch has padding
        ids = torch.randint(3, 64, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * 3 + ids[3:]})
    return rows


def _batch(seed: int = 1, n: int = 3):
    return CausalLMCollator(pad_token_id=PAD)(_rows(seed, n))


def _trainer(tmp_path, model=None, ga: int = 1, cls=ld.LdifsTrainer, **cfg):
    return tiny_trainer(
        cls,
        tmp_path,
        model if model is not None else tiny_peft_llama(),
        _rows(7, 6),
        collator=CausalLMCollator(pad_token_id=PAD),
        method_config=None if cls is FtguardTrainer else ld.LdifsConfig(**cfg),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=ga,
        seed=3,
    )


@torch.no_grad()
def _change_trainable(model, seed: int = 9):
    """Stand-in for some fine-tuning steps: move every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- independent computation


def _mlp_outputs(model, call):
    acts = {}
    layers = model.get_base_model().model.layers
    hooks = [
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, o))
        for i, layer in enumerate(layers)
    ]
    try:
        out = call()
    finally:
        for h in hooks:
            h.remove()
    return out, [acts[i] for i in range(len(layers))]


def ldifs_by_hand(model, frozen_copy, batch, rho: float, include_padding: bool, cap: float | None = None):
    """(loss, distance, grads, per-layer distances) with the start model as a separate deep copy, one position at a
    time; with ``cap``, a layer counts only if (ρ/2)·its distance < cap (the original's filter)."""
    leaves = {
        n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad
    }
    out, acts = _mlp_outputs(model, lambda: functional_call(model, leaves, (), dict(batch)))
    with torch.no_grad():
        _, ref = _mlp_outputs(
            frozen_copy,
            lambda: frozen_copy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
        )
    distance, layers = torch.zeros(()), []
    for a, r in zip(acts, ref, strict=True):
        layer = torch.zeros(())
        for b in range(batch["input_ids"].shape[0]):
            for t in range(batch["input_ids"].shape[1]):
                if include_padding or batch["attention_mask"][b, t]:
                    layer = layer + ((a[b, t] - r[b, t]) ** 2).sum()
        layers.append(layer.item())
        if cap is None or rho / 2 * layer.item() < cap:
            distance = distance + layer
    loss = out.loss + rho / 2 * distance
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), distance.detach(), dict(zip(leaves, grads, strict=True)), layers


# ----------------------------------------------------------------------------- tests


def test_config_defaults_and_validation():
    cfg = ld.LdifsConfig()
    assert (cfg.rho, cfg.include_padding, cfg.drop_layer_terms_above) == (1e-4, False, None)
    with pytest.raises(ConfigError, match="args.rho"):
        from_dict(ld.LdifsConfig, {"rho": -1.0}, prefix="args")
    with pytest.raises(ConfigError, match="args.drop_layer_terms_above"):
        from_dict(ld.LdifsConfig, {"drop_layer_terms_above": 0.0}, prefix="args")
    with pytest.raises(ConfigError, match="args.rhoo"):
        from_dict(ld.LdifsConfig, {"rhoo": 1.0}, prefix="args")


@pytest.mark.parametrize("fresh", [True, False])
def test_unchanged_model_gives_zero_distance_and_exactly_the_sft_step(tmp_path, fresh):
    trainer = _trainer(tmp_path, tiny_peft_llama(fresh=fresh), rho=10.0)
    assert trainer.reference.mode == ("disable_adapter" if fresh else "snapshot")
    sft = _trainer(tmp_path, tiny_peft_llama(fresh=fresh), cls=FtguardTrainer)
    loss = trainer.training_step(trainer.model, _batch())
    loss_sft = sft.training_step(sft.model, _batch())
    assert trainer._recorded["ldifs_distance"] == [0.0] and trainer._recorded["ldifs_penalty"] == [0.0]
    assert torch.equal(loss, loss_sft)
    g, g_sft = _grads(trainer.model), _grads(sft.model)
    assert g.keys() == g_sft.keys() and all(torch.equal(g[k], g_sft[k]) for k in g)


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("include_padding", [False, True])
def test_loss_and_gradient_match_a_hand_computation_after_the_weights_change(
    tmp_path, fresh, include_padding
):
    model = tiny_peft_llama(fresh=fresh)
    frozen_copy = copy.deepcopy(model).eval()
    rho = 40.0  # large enough that the penalty's gradient is of the CE's size on this tiny model
    trainer = _trainer(tmp_path, model, rho=rho, include_padding=include_padding)
    _change_trainable(model)
    batch = _batch()
    loss = trainer.training_step(model, dict(batch))
    want_loss, want_distance, want_grads, _ = ldifs_by_hand(model, frozen_copy, batch, rho, include_padding)
    _, _, sft_grads, _ = ldifs_by_hand(model, frozen_copy, batch, 0.0, include_padding)
    assert want_distance > 0.01
    assert trainer._recorded["ldifs_distance"][0] == pytest.approx(want_distance.item(), rel=1e-5)
    assert trainer._recorded["ldifs_penalty"][0] == pytest.approx(rho / 2 * want_distance.item(), rel=1e-5)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    got = _grads(model)
    assert got.keys() == want_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=name)
    moved = [n for n in want_grads if (want_grads[n] - sft_grads[n]).norm() > 0.2 * sft_grads[n].norm()]
    assert any("up_proj" in n for n in moved) and any("q_proj" in n for n in moved), (
        "the penalty shapes the update"
    )


def test_the_original_layer_filter_is_an_explicit_option(tmp_path):
    rho, batch = 40.0, _batch()
    model = tiny_peft_llama()
    frozen_copy = copy.deepcopy(model).eval()
    probe = copy.deepcopy(model)
    _change_trainable(probe)
    layers = ldifs_by_hand(probe, frozen_copy, batch, rho, False)[3]
    terms = sorted(rho / 2 * d for d in layers)
    assert terms[0] < 0.95 * terms[1], "the two layers' terms must differ to put the cap between them"
    cap = (terms[0] + terms[1]) / 2

    trainer = _trainer(tmp_path, model, rho=rho, drop_layer_terms_above=cap)
    _change_trainable(model)
    loss = trainer.training_step(model, dict(batch))
    want_loss, want_distance, want_grads, _ = ldifs_by_hand(model, frozen_copy, batch, rho, False, cap=cap)
    assert trainer._recorded["ldifs_layers_dropped"] == [1.0]
    assert trainer._recorded["ldifs_distance"][0] == pytest.approx(want_distance.item(), rel=1e-5)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    for name, want in want_grads.items():
        torch.testing.assert_close(_grads(model)[name], want, rtol=1e-4, atol=1e-6, msg=name)

    # as in the original, overflowing layers are dropped instead of stopping the run
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "up_proj.lora_B" in name:
                p.fill_(1e30)
    trainer.training_step(trainer.model, _batch())
    assert trainer._recorded["ldifs_layers_dropped"][-1] >= 1 and math.isfinite(
        trainer._recorded["ldifs_distance"][-1]
    )


def test_padding_positions_change_the_distance_only_when_included(tmp_path):
    batch = _batch()
    assert (batch["attention_mask"] == 0).any()
    values = {}
    for include in (False, True):
        trainer = _trainer(tmp_path, tiny_peft_llama(), include_padding=include)
        _change_trainable(trainer.model)
        trainer.training_step(trainer.model, dict(batch))
        values[include] = trainer._recorded["ldifs_distance"][0]
    assert values[True] > values[False] > 0


def test_one_model_forward_and_backward_and_one_reference_forward_that_skips_the_head(tmp_path):
    trainer = _trainer(tmp_path)
    base = trainer.model.get_base_model()
    forwards, head_calls, backwards = [], [], []
    base.model.register_forward_pre_hook(lambda m, a: forwards.append(torch.is_grad_enabled()))
    base.lm_head.register_forward_pre_hook(lambda m, a: head_calls.append(torch.is_grad_enabled()))
    backward = trainer.accelerator.backward
    trainer.accelerator.backward = lambda loss, **kw: (backwards.append(1), backward(loss, **kw))[-1]
    trainer.training_step(trainer.model, _batch())
    assert forwards == [True, False], "one model forward with autograd, one reference forward without"
    assert head_calls == [True], "the reference forward stops after the last MLP"
    assert backwards == [1]


def test_accumulation_of_two_micro_batches_is_the_mean_of_two_single_steps(tmp_path):
    x1, x2 = _batch(1), _batch(2)
    singles = []
    for x in (x1, x2):
        trainer = _trainer(tmp_path, rho=0.5)
        _change_trainable(trainer.model)
        trainer.training_step(trainer.model, dict(x))
        singles.append(_grads(trainer.model))
    trainer = _trainer(tmp_path, ga=2, rho=0.5)
    _change_trainable(trainer.model)
    trainer.training_step(trainer.model, dict(x1))
    trainer.training_step(trainer.model, dict(x2))
    accumulated = _grads(trainer.model)
    for name, g in accumulated.items():
        torch.testing.assert_close(
            g, (singles[0][name] + singles[1][name]) / 2, rtol=1e-5, atol=1e-7, msg=name
        )


def test_penalty_is_scaled_like_a_window_normalised_ce(tmp_path):
    ga, n_items, batch = 2, 11, _batch()
    trainer = _trainer(tmp_path, ga=ga, rho=0.5)
    _change_trainable(trainer.model)
    loss = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n_items)
    with torch.no_grad():
        ce = trainer.model(**batch, num_items_in_batch=n_items).loss.item()  # token sum / the window's count
    assert loss.item() == pytest.approx(ce + trainer._recorded["ldifs_penalty"][0] / ga, rel=1e-5)


def test_non_reentrant_checkpointing_gives_the_same_gradient_and_reentrant_is_refused(tmp_path):
    grads = {}
    for reentrant in (None, False, True):
        model = tiny_peft_llama()
        if reentrant is not None:
            model.get_base_model().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
        trainer = _trainer(tmp_path, model, rho=40.0)
        _change_trainable(model)
        if reentrant:  # the MLP outputs are computed without autograd: the penalty would have no gradient
            with pytest.raises(FtguardError, match="non-reentrant"):
                trainer.training_step(model, _batch())
        else:
            trainer.training_step(model, _batch())
            grads[reentrant] = _grads(model)
    for name, g in grads[None].items():
        torch.testing.assert_close(grads[False][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_starts_at_zero_and_stays_finite(tmp_path):
    trainer = _trainer(tmp_path)
    # One autocast region per step, as in training: autocast caches its bf16 weight copies within a region.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trainer.training_step(trainer.model, _batch())
    _change_trainable(trainer.model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trainer.training_step(trainer.model, _batch())
    assert (
        trainer._recorded["ldifs_distance"][0] == 0.0
        and 0 < trainer._recorded["ldifs_distance"][1] < math.inf
    )


def test_overflow_is_an_error_naming_the_step_and_what_to_lower(tmp_path):
    trainer = _trainer(tmp_path)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "up_proj.lora_B" in name:
                p.fill_(1e30)
    with pytest.raises(FtguardError, match=r"not finite at step 1 .*lower train.learning_rate or args.rho"):
        trainer.training_step(trainer.model, _batch())


def test_resume_continues_exactly_with_the_start_of_stage_reference(tmp_path):
    def run(out, max_steps, resume=None):
        trainer = tiny_trainer(
            ld.LdifsTrainer,
            out,
            tiny_peft_llama(fresh=False),
            _rows(7, 6),
            collator=CausalLMCollator(pad_token_id=PAD),
            method_config=ld.LdifsConfig(rho=1.0),
            per_device_train_batch_size=3,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=1,
            learning_rate=0.05,
            lr_scheduler_type="constant",
            seed=3,
            logging_steps=1,
        )
        trainer.train(resume_from_checkpoint=resume)
        penalties = [e["ldifs_penalty"] for e in trainer.state.log_history if "ldifs_penalty" in e]
        return {
            n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
        }, penalties

    straight, penalties = run(tmp_path / "a", 3)
    assert penalties[0] == 0.0 and penalties[-1] > 0, "the distance grows from zero as the model moves"
    resumed, resumed_penalties = run(tmp_path / "b_first", 1)
    resumed, resumed_penalties = run(
        tmp_path / "b_first", 3, resume=str(tmp_path / "b_first" / "checkpoint-1")
    )
    assert resumed_penalties[-2:] == pytest.approx(penalties[-2:], rel=1e-6)
    assert all(torch.allclose(resumed[n], straight[n], rtol=0, atol=1e-7) for n in straight)


def test_non_llama_layout_fails_before_training(tmp_path):
    model = tiny_peft_llama()
    for layer in model.get_base_model().model.layers:
        del layer.mlp
    with pytest.raises(FtguardError, match="ldifs: .*no `mlp` sub-module"):
        _trainer(tmp_path, model)


@pytest.mark.slow
def test_pipeline_runs_ldifs_finetune_end_to_end(tmp_path):
    from ftguard.config import load_config
    from ftguard.pipeline.run import run_pipeline

    cfg = load_config(
        "ldifs-tiny",
        [
            "evaluate.points=[]",
            "align.train.max_steps=2",
            "finetune.train.max_steps=3",
            "finetune.train.logging_steps=1",
            f"output_dir={tmp_path}",
        ],
    )
    run_pipeline(cfg)
    stage = next(p for p in tmp_path.iterdir() if p.name.startswith("finetune"))
    manifest = json.loads((stage / "COMPLETE.json").read_text())
    assert manifest["method"] == "ldifs" and manifest["steps"] == 3 and manifest["topology"] == "double"
    logs = [e for e in json.loads((stage / "train_log.json").read_text()) if "ldifs_distance" in e]
    assert (
        len(logs) == 3
        and logs[0]["ldifs_distance"] == 0.0
        and all(math.isfinite(e["ldifs_penalty"]) for e in logs)
    )
