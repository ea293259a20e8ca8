"""EWC (docs/methods.md, EWC): the Fisher and the penalty gradient against hand computations, once-only
Fisher, gradient accumulation, resume, the DDP reduction of F, config and data checks, and an end-to-end
run."""

from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call

import ftguard.methods.ewc as ewc_module
from ftguard.errors import FtguardError
from ftguard.methods.ewc import EWC, EWCConfig, EWCTrainer, rank_batches
from ftguard.schema import ConfigError
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


def _batch(seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    return collate(_rows(n, seed))


def _trainer(
    tmp_path,
    model=None,
    ga: int = 1,
    n_fisher: int = 10,
    max_steps: int = 1,
    save_steps: int | None = None,
    **cfg,
) -> EWCTrainer:
    cfg = {"lam": 50.0, "fisher_batch_size": 4, **cfg}
    return tiny_trainer(
        EWCTrainer,
        tmp_path,
        # lora_B ≠ 0: an alignment LoRA that was trained, which the single topology continues
        model if model is not None else tiny_lora_llama(),
        _rows(16, 1),
        method_config=EWCConfig(**cfg),
        aux={"fisher": _rows(n_fisher, 2)},
        per_device_train_batch_size=4,
        gradient_accumulation_steps=ga,
        max_steps=max_steps,
        seed=3,
        logging_steps=1,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
    )


# ----------------------------------------------------------------------- independent computation


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _grad(model, weights: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean response-token CE and its gradient at ``weights``, by a functional call on separate tensors."""
    leaves = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
    loss = functional_call(model, leaves, (), {k: v.clone() for k, v in batch.items()}).loss
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads, strict=True))


def _fisher_by_hand(model, w, rows, batch_size: int, batches=None) -> dict[str, torch.Tensor]:
    starts = range(0, len(rows), batch_size) if batches is None else batches
    fisher = {n: torch.zeros_like(t) for n, t in w.items()}
    for start in starts:
        _, g = _grad(model, w, collate(rows[start : start + batch_size]))
        for n in fisher:
            fisher[n] += g[n] ** 2
    return fisher


def _penalty_by_hand(w, w0, fisher, lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """λ·Σ F⊙(w − w₀)² and its gradient by autograd (not by the closed form the trainer uses)."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in w.items()}
    penalty = lam * sum((fisher[n] * (leaves[n] - w0[n]) ** 2).sum() for n in leaves)
    grads = torch.autograd.grad(penalty, list(leaves.values()))
    return penalty.detach(), dict(zip(leaves, grads, strict=True))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(actual: dict, expected: dict, rtol=1e-4, atol=1e-6) -> None:
    assert actual.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=rtol, atol=atol, msg=n)


def _move(model, seed: int = 5, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------- the update rule


def test_fisher_is_the_sum_over_batches_of_squared_gradients_at_the_start(tmp_path):
    trainer = _trainer(tmp_path, n_fisher=10, fisher_batch_size=4)  # batches of 4, 4 and 2
    model = trainer.model
    w0 = _weights(model)
    trainer.training_step(model, _batch(11))

    expected = _fisher_by_hand(model, w0, _rows(10, 2), batch_size=4)
    _assert_close(trainer.fisher, expected)
    assert all(expected[n].abs().sum() > 0 for n in expected), "non-trivial test: every tensor has a Fisher"
    assert all(torch.equal(trainer.anchor[n], w0[n]) for n in w0), "w₀ = the weights before the first update"
    assert trainer.fisher_batches == 3


def test_penalty_is_zero_at_the_start_and_the_first_gradient_is_plain_sft(tmp_path):
    trainer = _trainer(tmp_path)
    model = trainer.model
    w0 = _weights(model)
    x = _batch(11)
    loss = trainer.training_step(model, x)

    ell, g = _grad(model, w0, x)
    # No Fisher-pass gradient is left in .grad (the original leaves the last Fisher batch's there).
    _assert_close(_grads(model), g)
    assert trainer._recorded["ewc_penalty"] == [0.0]
    torch.testing.assert_close(loss, ell, rtol=1e-5, atol=1e-6)


def test_penalty_gradient_is_2_lambda_f_times_the_drift_after_moving_the_weights(tmp_path):
    lam = 50.0
    trainer = _trainer(tmp_path, lam=lam)
    model = trainer.model
    w0 = _weights(model)
    trainer.training_step(model, _batch(11))  # computes F at w0
    fisher = {n: t.clone() for n, t in trainer.fisher.items()}
    model.zero_grad(set_to_none=True)
    _move(model)
    w = _weights(model)
    x = _batch(12)
    loss = trainer.training_step(model, x)

    ell, g = _grad(model, w, x)
    penalty, g_pen = _penalty_by_hand(w, w0, fisher, lam)
    _assert_close(_grads(model), {n: g[n] + g_pen[n] for n in w})
    closed_form = {n: 2 * lam * fisher[n] * (w[n] - w0[n]) for n in w}
    _assert_close(g_pen, closed_form)  # the hand autograd agrees with the formula in docs/methods.md, EWC
    pen_norm = torch.sqrt(sum((t**2).sum() for t in g_pen.values()))
    sft_norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
    assert pen_norm > 0.1 * sft_norm, "non-trivial test: the penalty moves the gradient"
    assert trainer._recorded["ewc_penalty"][-1] == pytest.approx(penalty.item(), rel=1e-5)
    torch.testing.assert_close(loss, ell + penalty, rtol=1e-5, atol=1e-6)  # the logged loss is ℓ + penalty


def test_gradient_accumulation_2_is_the_mean_of_the_task_gradients_plus_the_penalty_once(tmp_path):
    lam = 50.0
    trainer = _trainer(tmp_path, ga=2, lam=lam)
    model = trainer.model
    w0 = _weights(model)
    trainer.training_step(model, _batch(10))
    fisher = {n: t.clone() for n, t in trainer.fisher.items()}
    model.zero_grad(set_to_none=True)
    _move(model)
    w = _weights(model)
    x1, x2 = _batch(11), _batch(12)
    trainer.training_step(model, x1)
    trainer.training_step(model, x2)  # must not wipe the first micro-batch's gradient

    _, g1 = _grad(model, w, x1)
    _, g2 = _grad(model, w, x2)
    _, g_pen = _penalty_by_hand(w, w0, fisher, lam)
    _assert_close(_grads(model), {n: (g1[n] + g2[n]) / 2 + g_pen[n] for n in w})


def test_fisher_is_computed_exactly_once_over_a_training_run(tmp_path):
    trainer = _trainer(tmp_path, n_fisher=10, fisher_batch_size=4, max_steps=3)
    forwards = []
    trainer.model.base_model.model.lm_head.register_forward_hook(lambda *a: forwards.append(1))
    trainer.train()
    assert len(forwards) == 3 + 3, "3 Fisher batches once, then one forward per step"
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and logs[0]["ewc_penalty"] == 0.0 and logs[2]["ewc_penalty"] > 0


def test_resume_restores_fisher_and_anchor_instead_of_recomputing_them(tmp_path):
    full = _trainer(tmp_path / "full", max_steps=4, save_steps=2)
    full.train()
    cut = _trainer(tmp_path / "cut", max_steps=4, save_steps=2)
    cut.args.max_steps = 3  # stop after the checkpoint at step 2 and one more step
    cut.train()
    resumed = _trainer(tmp_path / "cut", max_steps=4, save_steps=2)
    calls = []
    original = resumed._compute_fisher
    resumed._compute_fisher = lambda model: (calls.append(1), original(model))
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))

    assert calls == [], "F and w₀ come from the checkpoint, not from the weights at step 2"
    _assert_close(resumed.fisher, full.fisher, rtol=0, atol=0)
    _assert_close(resumed.anchor, full.anchor, rtol=0, atol=0)
    _assert_close(_weights(resumed.model), _weights(full.model), rtol=1e-5, atol=1e-7)


def test_a_resume_without_the_fisher_state_fails_instead_of_recomputing(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.state.global_step = 2
    with pytest.raises(FtguardError, match="without its Fisher.*delete the stage's checkpoints"):
        trainer.training_step(trainer.model, _batch(11))


def test_fisher_batches_are_shared_round_robin_and_cover_the_set_once():
    shares = [rank_batches(11, 3, rank, 3) for rank in range(3)]
    assert (
        shares[0] == [range(0, 3), range(9, 11)] and shares[1] == [range(3, 6)] and shares[2] == [range(6, 9)]
    )
    assert sorted(i for share in shares for b in share for i in b) == list(range(11))
    assert rank_batches(11, 3, 0, 1) == [range(0, 3), range(3, 6), range(6, 9), range(9, 11)]


def test_ddp_sums_each_ranks_partial_fisher_with_one_all_reduce(tmp_path, monkeypatch):
    """Rank 0 of 2 computes its batches (0 and 2 of 3) and all-reduces once; a fake reduce stands in for rank 1
    by doubling, so F must be twice rank 0's partial sum, in every tensor."""
    trainer = _trainer(tmp_path, n_fisher=10, fisher_batch_size=4)
    model = trainer.model
    w0 = _weights(model)
    reduces = []

    def all_reduce(tensor, op=None):
        reduces.append((tensor.numel(), op))
        tensor.mul_(2)

    monkeypatch.setattr(ewc_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ewc_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(ewc_module.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(ewc_module.dist, "all_reduce", all_reduce)
    trainer._compute_fisher(model)

    n_params = sum(t.numel() for t in w0.values())
    assert reduces == [(n_params, torch.distributed.ReduceOp.SUM)], "one reduce of all tensors, summed"
    partial = _fisher_by_hand(model, w0, _rows(10, 2), batch_size=4, batches=[0, 8])
    _assert_close(trainer.fisher, {n: 2 * t for n, t in partial.items()})
    assert trainer.fisher_batches == 3, "the batch count of the whole set"


# ----------------------------------------------------------------------- config, data, topology


def test_config_defaults_are_the_papers_and_bad_values_fail():
    cfg = EWC.parse_args({})
    assert (cfg.lam, cfg.fisher_samples, cfg.fisher_batch_size) == (1e9, None, 5)
    assert EWC.preferred_topology == "single" and EWC.required_roles == ("alignment",)
    with pytest.raises(ConfigError, match="'finetune.args.lam' must be a finite number ≥ 0"):
        EWC.parse_args({"lam": -1}, prefix="finetune.args")
    with pytest.raises(ConfigError, match="fisher_samples"):
        EWC.parse_args({"fisher_samples": 0})
    with pytest.raises(ConfigError, match="fisher_batch_size"):
        EWC.parse_args({"fisher_batch_size": 0})
    with pytest.raises(ConfigError, match="unknown key 'args.lamb'; did you mean 'lam'"):
        EWC.parse_args({"lamb": 1.0})


def _plan(n_alignment: int):
    rows = [f"ex{i}" for i in range(n_alignment)]

    def require(roles, who):
        if not rows:
            raise FtguardError(f"{who} needs the data role 'alignment', which is empty")

    return SimpleNamespace(alignment=rows, require=require)


def test_fisher_set_is_the_first_alignment_samples_and_too_many_fails_before_training():
    method = EWC(EWCConfig(fisher_samples=3))
    plan = _plan(5)
    ctx = SimpleNamespace(stage="finetune", plan=plan, tokenize=lambda exs: ("tok", exs))
    assert method.extra_datasets(ctx) == {"fisher": ("tok", ["ex0", "ex1", "ex2"])}
    assert EWC(EWCConfig()).extra_datasets(ctx) == {"fisher": ("tok", plan.alignment)}, "null = all of it"
    with pytest.raises(
        FtguardError, match=r"finetune.args.fisher_samples = 9 but the alignment set has 5 samples"
    ):
        EWC(EWCConfig(fisher_samples=9)).prepare_data(plan, None, "finetune")
    with pytest.raises(FtguardError, match="'alignment', which is empty"):
        EWC(EWCConfig()).prepare_data(_plan(0), None, "finetune")


def test_double_topology_warns_and_the_packaged_configs_use_single(caplog):
    from ftguard.resolve import load_run

    with caplog.at_level(logging.WARNING, logger="ftguard.methods.ewc"):
        load_run("quickstart-tiny", ["finetune.method=ewc"])
    assert "zero Fisher" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftguard.methods.ewc"):
        for name in ("ewc-tiny", "ewc-smollm2"):
            cfg = load_run(name).config
            assert cfg.finetune.method == "ewc" and cfg.adapter.topology == "single", name
    assert caplog.text == ""


@pytest.mark.slow
def test_pipeline_runs_ewc_fine_tuning_end_to_end(tmp_path):
    from ftguard.config import load_config
    from ftguard.pipeline.run import run_pipeline

    cfg = load_config(
        "ewc-tiny",
        [
            "evaluate.points=[]",
            "align.train.max_steps=2",
            "finetune.train.max_steps=3",
            "finetune.train.logging_steps=1",
            "finetune.args.fisher_samples=16",
            f"output_dir={tmp_path}",
        ],
    )
    run_pipeline(cfg)
    manifest = json.loads((tmp_path / "finetune" / "COMPLETE.json").read_text())
    assert manifest["method"] == "ewc" and manifest["steps"] == 3 and manifest["topology"] == "single"
    assert manifest["method_args"]["fisher_samples"] == 16
    logs = [e for e in json.loads((tmp_path / "finetune" / "train_log.json").read_text()) if "loss" in e]
    assert len(logs) == 3 and logs[0]["ewc_penalty"] == 0.0 and logs[-1]["ewc_penalty"] > 0


def test_lambda_zero_is_exactly_sft_after_the_fisher(tmp_path):
    from ftguard.training.trainer import FtguardTrainer

    model = tiny_lora_llama()
    sft_model = copy.deepcopy(model)
    trainer = _trainer(tmp_path / "e", model=model, lam=0.0)
    sft = FtguardTrainer(
        model=sft_model, args=trainer.args, train_dataset=trainer.train_dataset, data_collator=collate
    )
    sft.current_gradient_accumulation_steps = 1
    x = _batch(11)
    assert torch.equal(trainer.training_step(model, x), sft.training_step(sft_model, x))
    for (n, a), b in zip(_grads(model).items(), _grads(sft_model).values(), strict=True):
        assert torch.equal(a, b), n
