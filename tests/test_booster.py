"""Booster (docs/methods.md, Booster): the combined gradient against a hand computation, the exact probe, pass
counts."""

from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call

import ftguard.methods.booster  # noqa: F401  (registers "booster")
from ftguard.errors import FtguardError
from ftguard.methods.booster import (
    PROBE_EPS,
    Booster,
    BoosterConfig,
    BoosterTrainer,
    BoosterVaccine,
    BoosterVaccineConfig,
    BoosterVaccineTrainer,
)
from ftguard.schema import ConfigError
from ftguard.training.trainer import FtguardTrainer
from tiny import collate, tiny_lora_llama, tiny_trainer

SEQ = 7


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, SEQ), generator=g)
    return [
        {"input_ids": r.tolist(), "attention_mask": [1] * SEQ, "labels": [-100, -100, *r[2:].tolist()]}
        for r in ids
    ]


TRAIN_ARGS = {"per_device_train_batch_size": 4, "max_steps": 1, "seed": 3}


def _trainer(
    tmp_path, model=None, ga: int = 1, n_harmful: int = 12, bf16: bool = False, **cfg
) -> BoosterTrainer:
    model = model if model is not None else tiny_lora_llama()
    return tiny_trainer(
        BoosterTrainer,
        tmp_path,
        model,
        _rows(8, 1),
        method_config=BoosterConfig(**cfg),
        aux={"harmful": _rows(n_harmful, 2)},
        gradient_accumulation_steps=ga,
        bf16=bf16,
        **TRAIN_ARGS,
    )


def _spy_harmful(trainer) -> list[tuple[int | None, dict]]:
    """Record every harmful batch the trainer draws (and the batch size it asks for)."""
    drawn, original = [], trainer.aux_batch

    def aux_batch(name, batch_size=None):
        batch = original(name, batch_size)
        drawn.append((name, batch_size, batch))
        return batch

    trainer.aux_batch = aux_batch
    return drawn


def _batch(seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    return collate(_rows(n, seed))


# ----------------------------------------------------------------------- independent computation


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _grad(model, weights: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean response-token CE and its gradient at ``weights``, by a functional call on separate tensors."""
    leaves = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
    loss = functional_call(model, leaves, (), {k: v.clone() for k, v in batch.items()}).loss
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads, strict=True))


def _booster_by_hand(model, w, x, x_harm, lam: float, alpha: float):
    h, g_h = _grad(model, w, x_harm)
    norm = torch.sqrt(sum((g**2).sum() for g in g_h.values()))
    probed = {n: w[n] - alpha * g_h[n] / (norm + PROBE_EPS) for n in w}
    h_probed, g_h_probed = _grad(model, probed, x_harm)
    f, g_f = _grad(model, w, x)
    combined = {n: g_f[n] + lam * (g_h[n] - g_h_probed[n]) for n in w}
    return combined, {"f": f, "h": h, "h_probed": h_probed, "norm": norm, "probed": probed, "g_h": g_h}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------- the update rule


def test_step_gradient_is_g_f_plus_lambda_times_harmful_difference(tmp_path):
    trainer = _trainer(tmp_path, lam=5.0, alpha=0.1, harmful_batch_size=5)
    drawn = _spy_harmful(trainer)
    model = trainer.model
    w = _weights(model)
    x = _batch(11)
    loss = trainer.training_step(model, x)

    ((_, _, x_harm),) = drawn
    expected, parts = _booster_by_hand(model, w, x, x_harm, lam=5.0, alpha=0.1)
    _assert_close(_grads(model), expected)
    assert all(not torch.allclose(parts["g_h"][n], torch.zeros_like(parts["g_h"][n])) for n in w), (
        "non-trivial test"
    )
    torch.testing.assert_close(loss, parts["f"], rtol=1e-5, atol=1e-6)  # the logged loss is f
    recorded = {k: v[0] for k, v in trainer._recorded.items()}
    torch.testing.assert_close(recorded["booster_harmful_loss"], parts["h"].item(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        recorded["booster_harmful_loss_probed"], parts["h_probed"].item(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        recorded["booster_harmful_loss_reduction"],
        (parts["h"] - parts["h_probed"]).item(),
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(
        recorded["booster_harmful_grad_norm"], parts["norm"].item(), rtol=1e-5, atol=1e-6
    )
    assert recorded["booster_harmful_loss_reduction"] > 0, "a harmful descent step lowers h"


def test_lambda_zero_gives_exactly_the_sft_gradient(tmp_path):
    model = tiny_lora_llama()
    sft_model = copy.deepcopy(model)
    booster = _trainer(tmp_path / "b", model=model, lam=0.0)
    sft = tiny_trainer(FtguardTrainer, tmp_path / "s", sft_model, _rows(8, 1), **TRAIN_ARGS)
    x = _batch(11)
    loss_b = booster.training_step(model, x)
    loss_s = sft.training_step(sft_model, x)
    assert torch.equal(loss_b, loss_s)
    for (n, a), b in zip(_grads(model).items(), _grads(sft_model).values(), strict=True):
        assert torch.equal(a, b), n


def test_probe_step_has_norm_alpha_and_weights_are_restored_bit_exactly(tmp_path):
    alpha = 0.37  # not a power of two: w − s + s ≠ w in floating point for many entries
    trainer = _trainer(tmp_path, alpha=alpha)
    drawn = _spy_harmful(trainer)
    model = trainer.model
    w = _weights(model)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(_weights(mod)))
    trainer.training_step(model, _batch(11))

    assert len(seen) == 3, "h at w, h at the probed weights, f at w"
    at_w, probed, at_f = seen
    assert all(torch.equal(at_w[n], w[n]) and torch.equal(at_f[n], w[n]) for n in w), (
        "f is taken at w exactly"
    )
    after = _weights(model)
    assert all(torch.equal(after[n], w[n]) for n in w), "the step leaves the weights bit-identical"
    step_norm = torch.sqrt(sum(((probed[n] - w[n]).double() ** 2).sum() for n in w))
    assert step_norm.item() == pytest.approx(alpha, rel=1e-5)
    ((_, _, x_harm),) = drawn
    _, parts = _booster_by_hand(model, w, _batch(11), x_harm, lam=5.0, alpha=alpha)
    _assert_close(probed, parts["probed"])  # along −g_h over ALL trainable tensors (one global norm)
    # what the original does, subtracting then adding the step back, would not have restored them bit-exactly
    step = {n: alpha * parts["g_h"][n] / (parts["norm"] + PROBE_EPS) for n in w}
    assert any(not torch.equal((w[n] - step[n]) + step[n], w[n]) for n in w)


def test_probe_step_has_norm_alpha_under_bf16_autocast(tmp_path):
    # On a bf16 GPU (or a CPU with native bf16) the harmful passes run under autocast: the probe's norm and step
    # must still be fp32, or ‖w′ − w‖ misses α by the bf16 rounding of α/‖g_h‖ (up to 0.4%).
    alpha = 0.37
    trainer = _trainer(tmp_path, alpha=alpha, bf16=True)
    # As Trainer.train does: accelerate wraps the forward in autocast (the Trainer adds none of its own).
    model = trainer.accelerator.prepare_model(trainer.model)
    w = _weights(model)
    seen, autocast = [], []
    model.register_forward_pre_hook(lambda mod, args: seen.append(_weights(mod)))
    first_layer = model.base_model.model.model.layers[0]
    first_layer.register_forward_pre_hook(lambda mod, args: autocast.append(torch.is_autocast_enabled("cpu")))
    trainer.training_step(model, _batch(11))

    assert autocast == [True, True, True], "every pass under bf16 autocast"
    _, probed, _ = seen
    step_norm = torch.sqrt(sum(((probed[n] - w[n]).double() ** 2).sum() for n in w))
    assert abs(step_norm.item() - alpha) < 1e-4
    assert all(torch.equal(p.detach(), w[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_three_forward_and_three_backward_passes_per_step(tmp_path):
    trainer = _trainer(tmp_path)
    model = trainer.model
    counts = {"forward": 0, "backward": 0}

    def on_forward(module, args, out):
        counts["forward"] += 1
        out.register_hook(lambda g: counts.__setitem__("backward", counts["backward"] + 1))

    model.base_model.model.lm_head.register_forward_hook(on_forward)
    trainer.training_step(model, _batch(11))
    assert counts == {"forward": 3, "backward": 3}


def test_gradient_accumulation_2_is_the_mean_of_two_single_step_gradients(tmp_path):
    trainer = _trainer(tmp_path, ga=2)
    drawn = _spy_harmful(trainer)
    model = trainer.model
    w = _weights(model)
    x1, x2 = _batch(11), _batch(12)
    trainer.training_step(model, x1)
    trainer.training_step(model, x2)  # must not wipe the first micro-batch's gradient

    (_, _, h1), (_, _, h2) = drawn
    assert not torch.equal(h1["input_ids"], h2["input_ids"]), "each micro-batch draws its own harmful batch"
    g1, _ = _booster_by_hand(model, w, x1, h1, lam=5.0, alpha=0.1)
    g2, _ = _booster_by_hand(model, w, x2, h2, lam=5.0, alpha=0.1)
    _assert_close(_grads(model), {n: (g1[n] + g2[n]) / 2 for n in w})


def test_harmful_stream_is_drawn_with_the_configured_batch_size(tmp_path):
    trainer = _trainer(tmp_path, harmful_batch_size=3, n_harmful=7)
    drawn = _spy_harmful(trainer)
    for seed in (11, 12):
        trainer.training_step(trainer.model, _batch(seed, n=4))
    assert [(name, bs, b["input_ids"].shape[0]) for name, bs, b in drawn] == [("harmful", 3, 3)] * 2


def test_trainer_clips_and_steps_adamw_on_the_combined_gradient(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.args.logging_steps = 1
    trainer.args.max_grad_norm = 0.05  # below this model's gradient norm, so that the clip acts
    drawn = _spy_harmful(trainer)
    seen, step = [], trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        seen.append(({k: v.clone() for k, v in inputs.items()}, _weights(model)))
        return step(model, inputs, num_items_in_batch)

    trainer.training_step = training_step
    trainer.train()

    ((x, w),), ((_, _, x_harm),) = seen, drawn
    combined, _ = _booster_by_hand(trainer.model, w, x, x_harm, lam=5.0, alpha=0.1)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in combined.values())).item()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["grad_norm"] == pytest.approx(norm, rel=1e-4), "the Trainer's clip sees the combined gradient"
    assert norm > trainer.args.max_grad_norm, "clipping is active in this test"
    # One AdamW step (the Trainer's defaults) on the clipped combined gradient, done here by hand.
    leaves = [w[n].clone().requires_grad_(True) for n in w]
    clip = min(1.0, trainer.args.max_grad_norm / (norm + 1e-6))
    for leaf, n in zip(leaves, w, strict=True):
        leaf.grad = combined[n] * clip
    torch.optim.AdamW(leaves, lr=trainer.args.learning_rate, weight_decay=trainer.args.weight_decay).step()
    after = _weights(trainer.model)
    _assert_close(after, {n: leaf.detach() for n, leaf in zip(w, leaves, strict=True)})
    assert {
        "booster_harmful_loss",
        "booster_harmful_loss_probed",
        "booster_harmful_loss_reduction",
        "booster_harmful_grad_norm",
    } <= log.keys()


def test_ddp_reduces_once_per_optimizer_step_and_the_reduce_includes_the_harmful_term(tmp_path):
    """Under DDP (one gloo process; accelerate's no_sync is pointed at DDP's own, as it is with several processes),
    the harmful passes trigger no reduction and the last micro-batch's reduce carries the whole combined gradient.

    The comm hook doubles each bucket instead of averaging it: a term added after the reduce would not be doubled.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    trainer = _trainer(tmp_path, ga=2)
    drawn = _spy_harmful(trainer)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(trainer.model)
        reduces = []

        def doubling_hook(state, bucket):
            reduces.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer() * 2)
            return fut

        ddp.register_comm_hook(None, doubling_hook)
        trainer.accelerator.no_sync = lambda model: model.no_sync()
        w = _weights(trainer.model)
        x1, x2 = _batch(11), _batch(12)
        with ddp.no_sync():  # what the Trainer does for every micro-batch but the last
            trainer.training_step(ddp, x1)
        assert reduces == []
        trainer.training_step(ddp, x2)
        assert reduces == [0], "one bucket, reduced once, by the final backward only"
    finally:
        dist.destroy_process_group()
    (_, _, h1), (_, _, h2) = drawn
    g1, _ = _booster_by_hand(trainer.model, w, x1, h1, lam=5.0, alpha=0.1)
    g2, _ = _booster_by_hand(trainer.model, w, x2, h2, lam=5.0, alpha=0.1)
    _assert_close(
        _grads(trainer.model), {n: g1[n] + g2[n] for n in w}
    )  # 2 × their mean: all of it was reduced


# ----------------------------------------------------------------------- variant: Booster + Vaccine


def _vaccine_grad_by_hand(model, w, x, rho: float) -> dict[str, torch.Tensor]:
    """Vaccine's gradient (docs/methods.md, Vaccine) with hooks written here: ε_l = ρ·g_l/(‖g‖ + 1e-7) on each
    attention output."""
    attention = [layer.self_attn for layer in model.base_model.model.model.layers]
    outs = []
    handles = [m.register_forward_hook(lambda mod, a, out: outs.append(out[0])) for m in attention]
    leaves = {
        n: v.clone().requires_grad_(True) for n, v in w.items()
    }  # so the attention outputs need a gradient
    loss = functional_call(model, leaves, (), dict(x)).loss
    for h in handles:
        h.remove()
    g = torch.autograd.grad(loss, outs)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    eps = iter([rho * gi / (norm + 1e-7) for gi in g])
    handles = [m.register_forward_hook(lambda mod, a, out: (out[0] + next(eps), *out[1:])) for m in attention]
    try:
        return _grad(model, w, x)[1]
    finally:
        for h in handles:
            h.remove()


def _booster_vaccine_trainer(tmp_path, **cfg) -> BoosterVaccineTrainer:
    return tiny_trainer(
        BoosterVaccineTrainer,
        tmp_path,
        tiny_lora_llama(),
        _rows(8, 1),
        method_config=BoosterVaccineConfig(**cfg),
        aux={"harmful": _rows(12, 2)},
        **TRAIN_ARGS,
    )


def test_booster_vaccine_replaces_g_f_by_vaccines_perturbed_gradient(tmp_path):
    trainer = _booster_vaccine_trainer(tmp_path, harmful_batch_size=5)
    drawn = _spy_harmful(trainer)
    model = trainer.model
    counts = {"forward": 0, "backward": 0}

    def on_forward(module, args, out):
        counts["forward"] += 1
        out.register_hook(lambda g: counts.__setitem__("backward", counts["backward"] + 1))

    counter = model.base_model.model.lm_head.register_forward_hook(on_forward)
    w = _weights(model)
    x = _batch(11)
    trainer.training_step(model, x)
    counter.remove()
    assert counts == {"forward": 4, "backward": 4}

    ((_, _, x_harm),) = drawn
    booster, _ = _booster_by_hand(model, w, x, x_harm, lam=5.0, alpha=0.1)
    sft = _grad(model, w, x)[1]
    vaccine = _vaccine_grad_by_hand(model, w, x, rho=5.0)
    assert any(not torch.allclose(vaccine[n], sft[n], rtol=1e-3) for n in w), "ε = 5 changes the gradient"
    _assert_close(_grads(model), {n: booster[n] - sft[n] + vaccine[n] for n in w})
    assert {"booster_harmful_loss", "vaccine_perturbation_norm"} <= trainer._recorded.keys()


def test_booster_vaccine_config_has_rho_5_and_booster_defaults():
    cfg = BoosterVaccine.parse_args({})
    assert (cfg.rho, cfg.lam, cfg.alpha, cfg.harmful_batch_size) == (5.0, 5.0, 0.1, 10)
    with pytest.raises(ConfigError, match="unknown key 'args.layers'"):
        BoosterVaccine.parse_args({"layers": "topk"})
    with pytest.raises(ConfigError, match="rho"):
        BoosterVaccine.parse_args({"rho": -1})


# ----------------------------------------------------------------------- config, data, topology


def test_config_defaults_are_the_papers_and_bad_values_fail():
    cfg = Booster.parse_args({})
    assert (cfg.lam, cfg.alpha, cfg.harmful_batch_size, cfg.harmful_data) == (
        5.0,
        0.1,
        10,
        "alignment_harmful",
    )
    with pytest.raises(ConfigError, match="'align.args.alpha' must be a finite number > 0"):
        Booster.parse_args({"alpha": 0}, prefix="align.args")
    with pytest.raises(ConfigError, match="harmful_batch_size"):
        Booster.parse_args({"harmful_batch_size": 0})
    with pytest.raises(ConfigError, match="harmful_data"):
        Booster.parse_args({"harmful_data": "attack_pool"})


def test_harmful_stream_is_the_tokenized_alignment_harmful_set_and_empty_fails():
    method = Booster(BoosterConfig())
    rows = ["ex1", "ex2"]
    ctx = SimpleNamespace(
        stage="align", plan=SimpleNamespace(alignment_harmful=rows), tokenize=lambda exs: ("tok", exs)
    )
    assert method.extra_datasets(ctx) == {"harmful": ("tok", rows)}
    ctx.plan.alignment_harmful = []
    with pytest.raises(FtguardError, match=r"data\.finetune\.harmful.*same source/split"):
        method.extra_datasets(ctx)


def test_double_topology_is_refused_unless_explicitly_allowed(caplog):
    from ftguard.resolve import load_run

    with pytest.raises(ConfigError, match=r"'adapter.topology' is double.*adapter.topology: single"):
        load_run("quickstart-tiny", ["align.method=booster"])
    with caplog.at_level(logging.WARNING, logger="ftguard.methods.booster"):
        load_run("quickstart-tiny", ["align.method=booster", "align.args.allow_double_topology=true"])
    assert "ablation" in caplog.text
    load_run("quickstart-tiny", ["align.method=booster", "adapter.topology=single"])
    load_run(
        "quickstart-tiny", ["align.method=booster", "finetune=null", "evaluate.points=[base,align]"]
    )  # no fine-tuning: nothing to protect


def test_packaged_booster_configs_load_with_the_single_topology():
    from ftguard.config import load_config

    for name in ("booster-tiny", "booster-smollm2"):
        cfg = load_config(name)
        assert cfg.align.method == "booster" and cfg.adapter.topology == "single", name


@pytest.mark.slow
def test_pipeline_runs_booster_alignment_end_to_end(tmp_path):
    from ftguard.config import load_config
    from ftguard.pipeline.run import run_pipeline

    cfg = load_config(
        "quickstart-tiny",
        [
            "align.method=booster",
            "adapter.topology=single",
            "evaluate.points=[]",
            "align.train.max_steps=3",
            "align.train.logging_steps=1",
            "align.train.mixed_precision=bf16",  # the inner passes under autocast
            "align.args.harmful_batch_size=4",
            "finetune=null",
            f"output_dir={tmp_path}",
        ],
    )
    run_pipeline(cfg)
    manifest = json.loads((tmp_path / "align" / "COMPLETE.json").read_text())
    assert manifest["method"] == "booster" and manifest["steps"] == 3
    assert manifest["method_args"]["harmful_batch_size"] == 4
    logs = [e for e in json.loads((tmp_path / "align" / "train_log.json").read_text()) if "loss" in e]
    assert len(logs) == 3 and all(e["booster_harmful_loss"] > 0 for e in logs)


# ----------------------------------------------------------------------- refresh_every (opt-in approximation)


def test_refresh_every_k_adds_the_kept_harmful_term_between_refreshes_without_harmful_passes(tmp_path):
    trainer = _trainer(tmp_path, lam=5.0, alpha=0.1, refresh_every=2)
    drawn = _spy_harmful(trainer)
    model = trainer.model
    w = _weights(model)
    x0, x1, x2 = _batch(11), _batch(12), _batch(13)
    trainer.training_step(model, x0)  # step 0 refreshes: Booster's exact gradient
    ((_, _, h0),) = drawn
    expected0, parts = _booster_by_hand(model, w, x0, h0, lam=5.0, alpha=0.1)
    _assert_close(_grads(model), expected0)
    _, g_probed = _grad(model, parts["probed"], h0)
    kept = {n: 5.0 * (parts["g_h"][n] - g_probed[n]) for n in w}

    model.zero_grad(set_to_none=True)
    trainer.state.global_step = 1  # step 1 reuses: g_f(x1) + the kept term, no harmful batch drawn
    trainer.training_step(model, x1)
    assert len(drawn) == 1
    _, g_f1 = _grad(model, w, x1)
    _assert_close(_grads(model), {n: g_f1[n] + kept[n] for n in w})

    model.zero_grad(set_to_none=True)
    trainer.state.global_step = 2  # step 2 refreshes again
    trainer.training_step(model, x2)
    assert len(drawn) == 2
    expected2, _ = _booster_by_hand(model, w, x2, drawn[1][2], lam=5.0, alpha=0.1)
    _assert_close(_grads(model), expected2)
    assert trainer._recorded["booster_refreshed"] == [1.0, 0.0, 1.0]


def test_refresh_every_adds_the_kept_term_once_per_step_under_accumulation_and_survives_a_resume(tmp_path):
    trainer = _trainer(tmp_path / "a", ga=2, lam=5.0, alpha=0.1, refresh_every=3)
    model = trainer.model
    w = _weights(model)
    trainer.training_step(model, _batch(11))
    trainer.training_step(model, _batch(12))  # step 0's λ-term is the sum over its two micro-batches
    values, tensors = trainer.method_state()
    g_step0 = _grads(model)
    _, g_f11 = _grad(model, w, _batch(11))
    _, g_f12 = _grad(model, w, _batch(12))
    kept = {n: g_step0[n] - (g_f11[n] + g_f12[n]) / 2 for n in w}

    resumed = _trainer(tmp_path / "b", model=model, ga=2, lam=5.0, alpha=0.1, refresh_every=3)
    resumed.load_method_state(values, tensors)
    drawn = _spy_harmful(resumed)
    model.zero_grad(set_to_none=True)
    resumed.state.global_step = 1
    resumed.training_step(model, _batch(13))
    resumed.training_step(model, _batch(14))
    assert drawn == []
    _, g_f13 = _grad(model, w, _batch(13))
    _, g_f14 = _grad(model, w, _batch(14))
    _assert_close(_grads(model), {n: (g_f13[n] + g_f14[n]) / 2 + kept[n] for n in w})


def test_refresh_every_must_be_at_least_one():
    with pytest.raises(ConfigError, match="refresh_every"):
        BoosterConfig(refresh_every=0)
