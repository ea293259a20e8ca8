"""KL (docs/methods.md, KL): KL(teacher‖student) over the vocabulary against a hand computation with a
separate frozen copy (and not the original's sequence-axis softmax), its gradient, zero at the start,
pass counts, accumulation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.func import functional_call

import ftguard.methods.kl as klm
from ftguard.data.collate import CausalLMCollator
from ftguard.schema import ConfigError, from_dict
from ftguard.training.trainer import FtguardTrainer
from tiny import SHAPE, tiny_peft_llama, tiny_trainer

PAD = 0
VOCAB = SHAPE["vocab_size"]


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


def _trainer(tmp_path, model=None, ga: int = 1, cls=klm.KlTrainer, **cfg):
    return tiny_trainer(
        cls,
        tmp_path,
        model if model is not None else tiny_peft_llama(),
        _rows(7, 6),
        collator=CausalLMCollator(pad_token_id=PAD),
        method_config=None if cls is FtguardTrainer else klm.KlConfig(**cfg),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=ga,
        seed=3,
    )


@torch.no_grad()
def _change_trainable(model, seed: int = 9):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- independent computation


def kl_by_hand(student_logits, teacher_logits, mask, include_padding: bool):
    """Σ_positions Σ_v p_t(v)·(log p_t(v) − log p_s(v)) / batch, the softmax written out per position (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    batch, length, _ = student_logits.shape
    for b in range(batch):
        for t in range(length):
            if include_padding or mask[b, t]:
                s, te = student_logits[b, t].double(), teacher_logits[b, t].double()
                p_s = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                p_t = torch.exp(te - te.max()) / torch.exp(te - te.max()).sum()
                total = total + (p_t * (torch.log(p_t) - torch.log(p_s))).sum()
    return total / batch


def original_sequence_axis_kl(student_logits, teacher_logits):
    """The original's formula, softmax over dim=1, the sequence axis (docs/methods.md, Original-code bugs
    #4)."""
    return torch.nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(student_logits, dim=1), torch.softmax(teacher_logits, dim=1)
    )


def kl_loss_by_hand(model, frozen_copy, batch, lam: float, include_padding: bool):
    leaves = {
        n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad
    }
    out = functional_call(model, leaves, (), dict(batch))
    with torch.no_grad():
        teacher = frozen_copy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kl = kl_by_hand(out.logits, teacher, batch["attention_mask"], include_padding)
    loss = out.loss + lam * kl
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return (
        loss.detach().float(),
        kl.detach(),
        dict(zip(leaves, grads, strict=True)),
        out.logits.detach(),
        teacher,
    )


# ----------------------------------------------------------------------------- tests


def test_config_defaults_and_validation():
    assert klm.KlConfig().lam == 0.1 and klm.KlConfig().include_padding is False
    with pytest.raises(ConfigError, match="args.lam"):
        from_dict(klm.KlConfig, {"lam": float("nan")}, prefix="args")


@pytest.mark.parametrize("fresh", [True, False])
def test_kl_is_zero_at_the_start_and_the_step_is_sft(tmp_path, fresh):
    trainer = _trainer(tmp_path, tiny_peft_llama(fresh=fresh), lam=5.0)
    assert trainer.reference.mode == ("disable_adapter" if fresh else "snapshot")
    sft = _trainer(tmp_path, tiny_peft_llama(fresh=fresh), cls=FtguardTrainer)
    loss = trainer.training_step(trainer.model, _batch())
    loss_sft = sft.training_step(sft.model, _batch())
    assert trainer._recorded["kl_divergence"] == [0.0]
    assert torch.equal(loss, loss_sft)
    g, g_sft = _grads(trainer.model), _grads(sft.model)
    # ∂KL/∂logits = p_s − p_t vanishes up to the rounding of Σ p_t = 1 (about 1e-6 of the gradient here).
    assert g.keys() == g_sft.keys()
    for k in g_sft:
        torch.testing.assert_close(g[k], g_sft[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("include_padding", [False, True])
def test_kl_and_gradient_match_a_hand_computation_over_the_vocabulary(tmp_path, fresh, include_padding):
    model = tiny_peft_llama(fresh=fresh)
    frozen_copy = copy.deepcopy(model).eval()
    lam = 20.0  # the KL's gradient must be of the CE's size to be checked
    trainer = _trainer(tmp_path, model, lam=lam, include_padding=include_padding)
    _change_trainable(model)
    batch = _batch()
    loss = trainer.training_step(model, dict(batch))
    want_loss, want_kl, want_grads, student, teacher = kl_loss_by_hand(
        model, frozen_copy, batch, lam, include_padding
    )
    _, _, ce_grads, _, _ = kl_loss_by_hand(model, frozen_copy, batch, 0.0, include_padding)
    assert want_kl > 0.01
    assert trainer._recorded["kl_divergence"][0] == pytest.approx(want_kl.item(), rel=1e-5)
    assert trainer._recorded["kl_divergence"][0] != pytest.approx(
        original_sequence_axis_kl(student, teacher).item(), rel=0.05
    )
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    got = _grads(model)
    assert got.keys() == want_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(got[name], want.float(), rtol=1e-4, atol=1e-6, msg=name)
    assert any((want_grads[n] - ce_grads[n]).norm() > 0.2 * ce_grads[n].norm() for n in want_grads)


def test_sequence_kl_is_over_the_vocabulary_not_the_sequence_axis():
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    keep = torch.ones(2, 5, dtype=torch.bool)
    ours = klm.sequence_kl(student, teacher, keep)
    assert ours.item() == pytest.approx(kl_by_hand(student, teacher, keep, False).item(), rel=1e-5)
    assert ours.item() != pytest.approx(original_sequence_axis_kl(student, teacher).item(), rel=0.05)
    # a shift of a position's logits by a constant leaves its next-token distribution, hence our KL, unchanged
    shifted = student.clone()
    shifted[0, 2] += 3.0
    assert klm.sequence_kl(shifted, teacher, keep).item() == pytest.approx(ours.item(), rel=1e-5)
    assert original_sequence_axis_kl(shifted, teacher).item() != pytest.approx(
        original_sequence_axis_kl(student, teacher).item(), rel=1e-3
    )


def seq_axis_kl_by_hand(student_logits, teacher_logits):
    """For each sequence b and vocabulary entry v, the KL between the two distributions over positions t of the
    logit of v (softmax written out, float64); summed, divided by the batch: the original's term as it computes."""
    total = torch.zeros((), dtype=torch.float64)
    batch, _, vocab = student_logits.shape
    for b in range(batch):
        for v in range(vocab):
            s, te = student_logits[b, :, v].double(), teacher_logits[b, :, v].double()
            p_s = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
            p_t = torch.exp(te - te.max()) / torch.exp(te - te.max()).sum()
            total = total + (p_t * (torch.log(p_t) - torch.log(p_s))).sum()
    return total / batch


def test_the_original_mode_is_the_sequence_axis_term_over_every_position(tmp_path):
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    got = klm.original_sequence_axis_kl(student, teacher)
    assert got.item() == pytest.approx(seq_axis_kl_by_hand(student, teacher).item(), rel=1e-5)
    assert got.item() == pytest.approx(original_sequence_axis_kl(student, teacher).item(), rel=1e-5)
    # the step: ℓ + λ·(that term) on the model's and the frozen start's logits, padding positions included
    model = tiny_peft_llama(fresh=False)
    frozen_copy = copy.deepcopy(model).eval()
    trainer = _trainer(tmp_path, model, lam=0.5, mode="original")
    _change_trainable(model)
    batch = _batch()
    assert not batch["attention_mask"].all()  # the batch has padding, which the original counts
    loss = trainer.training_step(model, dict(batch))
    with torch.no_grad():
        out = model(**batch)
        teacher_logits = frozen_copy(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    want = seq_axis_kl_by_hand(out.logits, teacher_logits)
    assert trainer._recorded["kl_divergence"][0] == pytest.approx(want.item(), rel=1e-5)
    assert loss.item() == pytest.approx(out.loss.item() + 0.5 * want.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="args.mode"):
        from_dict(klm.KlConfig, {"mode": "sequence"}, prefix="args")


def test_one_student_forward_and_backward_and_one_teacher_forward(tmp_path):
    trainer = _trainer(tmp_path)
    base = trainer.model.get_base_model()
    forwards, backwards = [], []
    base.model.register_forward_pre_hook(lambda m, a: forwards.append(torch.is_grad_enabled()))
    backward = trainer.accelerator.backward
    trainer.accelerator.backward = lambda loss, **kw: (backwards.append(1), backward(loss, **kw))[-1]
    trainer.training_step(trainer.model, _batch())
    assert forwards == [True, False] and backwards == [1]


def test_accumulation_of_two_micro_batches_is_the_mean_of_two_single_steps(tmp_path):
    x1, x2 = _batch(1), _batch(2)
    singles = []
    for x in (x1, x2):
        trainer = _trainer(tmp_path, lam=2.0)
        _change_trainable(trainer.model)
        trainer.training_step(trainer.model, dict(x))
        singles.append(_grads(trainer.model))
    trainer = _trainer(tmp_path, ga=2, lam=2.0)
    _change_trainable(trainer.model)
    trainer.training_step(trainer.model, dict(x1))
    trainer.training_step(trainer.model, dict(x2))
    for name, g in _grads(trainer.model).items():
        torch.testing.assert_close(
            g, (singles[0][name] + singles[1][name]) / 2, rtol=1e-5, atol=1e-7, msg=name
        )


def test_kl_term_is_scaled_like_a_window_normalised_ce(tmp_path):
    ga, n_items, batch = 2, 11, _batch()
    trainer = _trainer(tmp_path, ga=ga, lam=2.0)
    _change_trainable(trainer.model)
    loss = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n_items)
    with torch.no_grad():
        ce = trainer.model(**batch, num_items_in_batch=n_items).loss.item()
    assert loss.item() == pytest.approx(ce + 2.0 * trainer._recorded["kl_divergence"][0] / ga, rel=1e-5)


@pytest.mark.slow
def test_pipeline_runs_kl_finetune_end_to_end(tmp_path):
    from ftguard.config import load_config
    from ftguard.pipeline.run import run_pipeline

    cfg = load_config(
        "kl-tiny",
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
    assert manifest["method"] == "kl" and manifest["steps"] == 3 and manifest["method_args"]["lam"] == 0.1
    logs = [e for e in json.loads((stage / "train_log.json").read_text()) if "kl_divergence" in e]
    assert (
        len(logs) == 3
        and logs[0]["kl_divergence"] == 0.0
        and all(math.isfinite(e["kl_divergence"]) for e in logs)
    )
