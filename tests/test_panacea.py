"""Panacea (docs/methods.md, Panacea): ε and the combined gradient against a hand computation, the exact restore,
the clamp, accumulation, the shipped model w_T + ε_T (also after a resume), data and config checks."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import TrainerCallback

import ftguard.methods.panacea  # noqa: F401  (registers "panacea")
from ftguard import distributed
from ftguard.errors import FtguardError
from ftguard.methods.panacea import PERTURB_EPS, Panacea, PanaceaConfig, PanaceaTrainer
from ftguard.methods.registry import get_method
from ftguard.schema import ConfigError
from ftguard.training.trainer import FtguardTrainer
from tiny import collate, tiny_lora_llama, tiny_trainer

SEQ = 7
LAM, RHO = 2.0, 0.5  # far from the paper's λ = 0.001, so that the λ-term is well above the tolerances

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, SEQ), generator=g)
    return [
        {"input_ids": r.tolist(), "attention_mask": [1] * SEQ, "labels": [-100, -100, *r[2:].tolist()]}
        for r in ids
    ]


TRAIN_ARGS = {"per_device_train_batch_size": 4, "max_steps": 1, "seed": 3}


def _config(**cfg) -> PanaceaConfig:
    return PanaceaConfig(**{"lam": LAM, "rho": RHO, "harmful_batch_size": 5, "harmful_loss_cap": None, **cfg})


def _trainer(tmp_path, model=None, ga: int = 1, **cfg) -> PanaceaTrainer:
    args = {
        **TRAIN_ARGS,
        **{k: cfg.pop(k) for k in list(cfg) if k in ("max_steps", "save_strategy", "save_steps")},
    }
    return tiny_trainer(
        PanaceaTrainer,
        tmp_path,
        model if model is not None else tiny_lora_llama(),
        _rows(8, 1),
        method_config=_config(**cfg),
        aux={"harmful": _rows(12, 2)},
        gradient_accumulation_steps=ga,
        **args,
    )


def _spy_harmful(trainer) -> list[dict]:
    drawn, original = [], trainer.aux_batch

    def aux_batch(name, batch_size=None):
        batch = original(name, batch_size)
        drawn.append(batch)
        return batch

    trainer.aux_batch = aux_batch
    return drawn


def _batch(seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    return collate(_rows(n, seed))


# ----------------------------------------------------------------------- independent computation


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _grad(model, weights, batch, cap: float | None = None):
    """Mean response-token CE (clamped at ``cap`` with torch.clamp, as the original) and its gradient at
    ``weights``, by a functional call on separate leaf tensors."""
    leaves = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
    loss = functional_call(model, leaves, (), {k: v.clone() for k, v in batch.items()}).loss
    if cap is not None:
        loss = torch.clamp(loss, max=cap)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return loss.detach(), dict(zip(leaves, grads, strict=True))


def _panacea_by_hand(model, w, x, x_harm, lam=LAM, rho=RHO, cap=None):
    h, g_h = _grad(model, w, x_harm)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g_h.values())).float()
    eps = {n: rho * g_h[n] / (norm + PERTURB_EPS) for n in w}
    h_eps, g_h_eps = _grad(model, {n: w[n] + eps[n] for n in w}, x_harm, cap)
    loss, g_l = _grad(model, w, x)
    combined = {n: g_l[n] - lam * (g_h_eps[n] - g_h[n]) for n in w}
    return combined, {"loss": loss, "h": h, "h_eps": h_eps, "norm": norm, "eps": eps, "g_h": g_h}


def _assert_close(actual: dict, expected: dict, rtol=1e-4, atol=1e-6) -> None:
    assert actual.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=rtol, atol=atol, msg=n)


# ----------------------------------------------------------------------- one step


def test_step_gradient_is_task_gradient_minus_lambda_times_harmful_increase(tmp_path):
    trainer = _trainer(tmp_path)
    drawn = _spy_harmful(trainer)
    model = trainer.model
    w, x = _weights(model), _batch(11)
    loss = trainer.training_step(model, x)

    (x_harm,) = drawn
    assert x_harm["input_ids"].shape[0] == 5, "harmful_batch_size rows"
    expected, parts = _panacea_by_hand(model, w, x, x_harm)
    _assert_close(_grads(model), expected)
    # The λ-term is far above the tolerance, so a missing or mis-signed term fails the check above.
    _, g_l = _grad(model, w, x)
    assert max((expected[n] - g_l[n]).abs().max().item() for n in w) > 1e-3
    torch.testing.assert_close(loss, parts["loss"], rtol=1e-5, atol=1e-6)  # the logged loss is ℓ
    recorded = {k: v[0] for k, v in trainer._recorded.items()}
    for key, value in (
        ("panacea_harmful_loss", parts["h"]),
        ("panacea_harmful_loss_perturbed", parts["h_eps"]),
        ("panacea_harmful_loss_increase", parts["h_eps"] - parts["h"]),
        ("panacea_harmful_grad_norm", parts["norm"]),
    ):
        assert recorded[key] == pytest.approx(value.item(), rel=1e-4, abs=1e-6), key
    assert recorded["panacea_capped"] == 0.0
    assert recorded["panacea_harmful_loss_increase"] > 0, "an ascent step of the harmful loss raises it"


def test_epsilon_is_rho_times_the_normalised_harmful_gradient_and_w_is_restored_bit_exactly(tmp_path):
    rho = 0.37  # not a power of two: w + ε − ε ≠ w in floating point for many entries
    trainer = _trainer(tmp_path, rho=rho)
    drawn = _spy_harmful(trainer)
    model = trainer.model
    w, x = _weights(model), _batch(11)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(_weights(mod)))
    trainer.training_step(model, x)

    assert len(seen) == 3, "h at w, h at w + ε, ℓ at w"
    at_w, perturbed, at_l = seen
    assert all(torch.equal(at_w[n], w[n]) and torch.equal(at_l[n], w[n]) for n in w), (
        "ℓ is taken at w exactly"
    )
    assert all(torch.equal(p.detach(), w[n]) for n, p in model.named_parameters() if p.requires_grad)
    (x_harm,) = drawn
    _, parts = _panacea_by_hand(model, w, x, x_harm, rho=rho)
    kept = dict(zip(w, trainer.epsilon, strict=True))
    _assert_close(kept, parts["eps"])  # along +g_h over ALL trainable tensors, one global norm
    _assert_close({n: perturbed[n] - w[n] for n in w}, parts["eps"], atol=1e-6)
    assert torch.sqrt(sum((e.double() ** 2).sum() for e in trainer.epsilon)).item() == pytest.approx(
        rho, rel=1e-6
    )
    assert all(not torch.equal(e, torch.zeros_like(e)) for e in trainer.epsilon), "every tensor is perturbed"
    # the original's w + ε − ε would not have restored them bit-exactly
    assert any(not torch.equal((w[n] + kept[n]) - kept[n], w[n]) for n in w)


def test_the_clamp_drops_the_perturbed_harmful_gradient_above_the_cap(tmp_path):
    model = tiny_lora_llama()
    x = _batch(11)
    by_cap = {}
    for cap in (None, 1e6, 1.0):
        trainer = _trainer(tmp_path / str(cap), model=copy.deepcopy(model), harmful_loss_cap=cap)
        drawn = _spy_harmful(trainer)
        w = _weights(trainer.model)
        trainer.training_step(trainer.model, x)
        expected, parts = _panacea_by_hand(trainer.model, w, x, drawn[0], cap=cap)
        _assert_close(_grads(trainer.model), expected)
        by_cap[cap] = (_grads(trainer.model), trainer._recorded["panacea_capped"], parts)
    assert by_cap[None][2]["h_eps"] > 1.0, "the cap 1.0 is below h(w + ε) on this model"
    assert by_cap[None][1] == by_cap[1e6][1] == [0.0] and by_cap[1.0][1] == [1.0]
    assert all(
        torch.equal(a, b) for a, b in zip(by_cap[None][0].values(), by_cap[1e6][0].values(), strict=True)
    )
    # Capped: g_h′ = 0 (torch.clamp's gradient above its bound), so the step is g_ℓ + λ·g_h.
    parts = by_cap[1.0][2]
    _, g_l = _grad(model, _weights(model), x)
    _assert_close(by_cap[1.0][0], {n: g_l[n] + LAM * parts["g_h"][n] for n in g_l})


def test_lambda_zero_gives_exactly_the_sft_gradient(tmp_path):
    model = tiny_lora_llama()
    sft_model = copy.deepcopy(model)
    panacea = _trainer(tmp_path / "p", model=model, lam=0.0)
    sft = tiny_trainer(FtguardTrainer, tmp_path / "s", sft_model, _rows(8, 1), **TRAIN_ARGS)
    x = _batch(11)
    assert torch.equal(panacea.training_step(model, x), sft.training_step(sft_model, x))
    for (n, a), b in zip(_grads(model).items(), _grads(sft_model).values(), strict=True):
        assert torch.equal(a, b), n


def test_three_forward_and_three_backward_passes_per_step(tmp_path):
    trainer = _trainer(tmp_path)
    counts = {"forward": 0, "backward": 0}

    def on_forward(module, args, out):
        counts["forward"] += 1
        out.register_hook(lambda g: counts.__setitem__("backward", counts["backward"] + 1))

    trainer.model.base_model.model.lm_head.register_forward_hook(on_forward)
    trainer.training_step(trainer.model, _batch(11))
    assert counts == {"forward": 3, "backward": 3}


def test_gradient_accumulation_2_is_the_mean_of_two_single_step_gradients_and_keeps_the_last_epsilon(
    tmp_path,
):
    trainer = _trainer(tmp_path, ga=2)
    drawn = _spy_harmful(trainer)
    model = trainer.model
    w = _weights(model)
    x1, x2 = _batch(11), _batch(12)
    trainer.training_step(model, x1)
    trainer.training_step(model, x2)  # must not wipe the first micro-batch's gradient

    h1, h2 = drawn
    assert not torch.equal(h1["input_ids"], h2["input_ids"]), "each micro-batch draws its own harmful batch"
    g1, _ = _panacea_by_hand(model, w, x1, h1)
    g2, parts2 = _panacea_by_hand(model, w, x2, h2)
    _assert_close(_grads(model), {n: (g1[n] + g2[n]) / 2 for n in w})
    _assert_close(dict(zip(w, trainer.epsilon, strict=True)), parts2["eps"])


# ----------------------------------------------------------------------- the shipped model


class _Snapshots(TrainerCallback):
    """The trainable weights at the start of each optimizer step and when the Trainer's loop ends."""

    def __init__(self) -> None:
        self.begin, self.end = [], None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.begin.append(_weights(model))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end = _weights(model)


def test_the_final_model_is_the_trained_weights_plus_the_last_epsilon(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    drawn = _spy_harmful(trainer)
    snaps = _Snapshots()
    trainer.add_callback(snaps)
    trainer.train()

    w1, w_t = snaps.begin[1], snaps.end
    assert any(not torch.equal(w1[n], w_t[n]) for n in w_t), "the last step moved the weights"
    # ε_T is the last step's: taken at the weights before the last optimizer step, on its harmful batch.
    _, parts = _panacea_by_hand(trainer.model, w1, _batch(0), drawn[-1])
    eps = dict(zip(w_t, trainer.epsilon, strict=True))
    _assert_close(eps, parts["eps"])
    final = _weights(trainer.model)
    assert all(torch.equal(final[n], w_t[n] + eps[n]) for n in w_t), "w_T + ε_T, exactly"
    entry = trainer.state.log_history[-1]
    assert entry["step"] == 2
    assert entry["panacea_perturbation_norm"] == pytest.approx(RHO, rel=1e-5)


def test_add_perturbation_false_ships_the_trained_weights(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, add_perturbation=False)
    snaps = _Snapshots()
    trainer.add_callback(snaps)
    trainer.train()
    final = _weights(trainer.model)
    assert all(torch.equal(final[n], snaps.end[n]) for n in final)
    assert trainer.epsilon is not None and "panacea_perturbation_norm" not in trainer.state.log_history[-1]


def test_a_resume_at_the_last_checkpoint_ships_the_same_model(tmp_path):
    ckpt = {"max_steps": 2, "save_strategy": "steps", "save_steps": 1}
    first = _trainer(tmp_path / "a", **ckpt)
    first.train()
    shipped = _weights(first.model)
    saved = load_file(str(tmp_path / "a" / "checkpoint-2" / "ftguard_method_state.safetensors"))
    assert all(torch.equal(saved[n], e) for n, e in zip(shipped, first.epsilon, strict=True))

    # A fresh trainer on the same start: the loop has no step left, and ε comes from the checkpoint.
    again = _trainer(tmp_path / "a", **ckpt)
    again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert again.state.global_step == 2
    assert all(torch.equal(p, shipped[n]) for n, p in _weights(again.model).items())
    state = json.loads((tmp_path / "a" / "checkpoint-2" / "ftguard_state.json").read_text())
    assert state["method"] == {"panacea_epsilon": True}


def test_a_checkpoint_of_other_parameters_or_no_step_fails_by_name(tmp_path):
    trainer = _trainer(tmp_path)
    with pytest.raises(FtguardError, match="panacea: the checkpoint's perturbation"):
        trainer.load_method_state({"panacea_epsilon": True}, {"other.weight": torch.zeros(2)})
    with pytest.raises(FtguardError, match="no training step computed the perturbation"):
        trainer.add_perturbation()


def test_the_stage_saves_the_perturbed_adapter_and_merges_it(tmp_path, monkeypatch):
    from ftguard.pipeline.run import run_pipeline
    from ftguard.resolve import load_run

    seen = {}
    real = PanaceaTrainer.add_perturbation

    def spy(self):
        seen["before"] = _weights(self.model)
        real(self)
        seen["after"] = _weights(self.model)
        seen["epsilon"] = dict(zip(seen["before"], self.epsilon, strict=True))
        q = self.model.base_model.model.model.layers[0].self_attn.q_proj
        seen["q"] = (q.base_layer.weight.detach().clone(), q.scaling["default"])

    monkeypatch.setattr(PanaceaTrainer, "add_perturbation", spy)
    overrides = ["align=null", "evaluate.points=[]", "finetune.train.max_steps=2", "data.finetune.n=8"]
    run = load_run("panacea-tiny", [*overrides, f"output_dir={tmp_path / 'run'}"])
    run_pipeline(run, train=("finetune",), evaluate=False)

    before, after, eps = seen["before"], seen["after"], seen["epsilon"]
    assert all(torch.equal(after[n], before[n] + eps[n]) for n in before)
    unit = tmp_path / "run" / "finetune"
    adapter = load_file(str(unit / "adapter" / "adapter_model.safetensors"))
    assert {k.replace(".default.", ".") for k in after} == set(adapter)
    assert all(torch.equal(adapter[n.replace(".default.", ".")], w) for n, w in after.items()), (
        "the adapter holds ε"
    )
    # The merged model is W + s·B·A of the perturbed LoRA.
    base, scaling = seen["q"]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = after[f"{prefix}.lora_A.default.weight"], after[f"{prefix}.lora_B.default.weight"]
    merged = load_file(str(unit / "model" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(merged, base + scaling * b @ a)
    unperturbed = before[f"{prefix}.lora_B.default.weight"] @ before[f"{prefix}.lora_A.default.weight"]
    assert (merged - (base + scaling * unperturbed)).abs().max() > 1e-4
    log = json.loads((unit / "train_log.json").read_text())
    assert log[-1]["panacea_perturbation_norm"] == pytest.approx(1.0, rel=1e-5)  # ρ of panacea-tiny


# ----------------------------------------------------------------------- config, data, registration


def test_config_defaults_are_the_authors_and_bad_values_fail_by_name():
    cfg = Panacea.parse_args({})
    assert (cfg.lam, cfg.rho, cfg.harmful_batch_size, cfg.harmful_samples, cfg.harmful_loss_cap) == (
        0.001,
        1.0,
        10,
        1000,
        5.0,
    )
    assert cfg.add_perturbation is True
    for key, value, message in (
        ("lam", -1.0, "must be a finite number ≥ 0"),
        ("lam", float("nan"), "must be a finite number ≥ 0"),
        ("rho", 0.0, "must be a finite number > 0"),
        ("rho", float("inf"), "must be a finite number > 0"),
        ("harmful_batch_size", 0, "must be ≥ 1"),
        ("harmful_samples", 0, "must be ≥ 1 or null"),
        ("harmful_loss_cap", 0.0, "must be a finite number > 0 or null"),
        ("harmful_loss_cap", float("nan"), "must be a finite number > 0 or null"),
    ):
        with pytest.raises(ConfigError) as err:
            Panacea.parse_args({key: value}, prefix="finetune.args")
        assert f"'finetune.args.{key}' {message}" in str(err.value) and "\n" not in str(err.value), key
    with pytest.raises(ConfigError, match="finetune.args.epsilon"):
        Panacea.parse_args({"epsilon": 1}, prefix="finetune.args")


def test_the_harmful_set_is_the_first_n_harmful_answers_of_the_alignment_prompts():
    plan = SimpleNamespace(alignment_harmful=["h1", "h2", "h3"])
    ctx = SimpleNamespace(stage="finetune", plan=plan, tokenize=lambda exs: ("tok", exs))
    assert Panacea(PanaceaConfig(harmful_samples=2)).extra_datasets(ctx) == {"harmful": ("tok", ["h1", "h2"])}
    assert Panacea(PanaceaConfig(harmful_samples=None)).extra_datasets(ctx)["harmful"][1] == [
        "h1",
        "h2",
        "h3",
    ]
    with pytest.raises(FtguardError, match=r"finetune\.args\.harmful_samples = 4 but the data plan has 3"):
        Panacea(PanaceaConfig(harmful_samples=4)).extra_datasets(ctx)
    with pytest.raises(FtguardError, match="alignment_harmful"):
        Panacea(PanaceaConfig()).extra_datasets(
            SimpleNamespace(stage="finetune", plan=SimpleNamespace(alignment_harmful=[]), tokenize=list)
        )


def test_a_run_with_too_few_harmful_samples_fails_before_any_work(tmp_path):
    from ftguard.pipeline.run import run_pipeline
    from ftguard.resolve import load_run

    run = load_run("panacea-tiny", [f"output_dir={tmp_path / 'run'}", "finetune.args.harmful_samples=100000"])
    with pytest.raises(FtguardError, match="harmful_samples = 100000"):
        run_pipeline(run, evaluate=False)
    assert not any((tmp_path / "run").glob("**/COMPLETE.json"))


def test_registration_stage_topology_and_refused_modes():
    cls = get_method("panacea", "finetune")
    assert (
        cls is Panacea and cls.preferred_topology == "single" and cls.required_roles == ("alignment_harmful",)
    )
    with pytest.raises(FtguardError, match="runs in stage"):
        get_method("panacea", "align")
    assert set(cls.unsupported_modes) == {"fsdp", *distributed.DEEPSPEED}
    assert cls.bench_args == cls.demo_args == {"harmful_samples": None}
