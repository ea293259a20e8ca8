"""RepNoise (docs/methods.md, RepNoise): every loss term against an independent computation, GA scaling, SFT
limit."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ftguard.methods.repnoise as rn
from ftguard.data.collate import CausalLMCollator
from ftguard.errors import FtguardError
from ftguard.schema import ConfigError, from_dict
from ftguard.training.trainer import FtguardTrainer
from tiny import tiny_llama, tiny_peft_llama, tiny_trainer

PAD = 0
# Harmless (alignment) rows share a "template" prefix [1, 5, 6] with the harmful rows; lengths differ.
HARMLESS = [
    ([1, 5, 6, 10, 11, 12, 2], 4),  # (input_ids, index of the first response token)
    ([1, 5, 6, 13, 14, 2], 4),
    ([1, 5, 6, 15, 16, 17, 18, 19, 2], 5),
]
HARMFUL = [
    [1, 5, 6, 20, 21, 22, 23, 2],
    [1, 5, 6, 13, 30, 2],  # same id 13 as harmless row 1 at column 3
    [1, 5, 7, 15, 31, 32, 33, 34, 35, 2],  # longer than every harmless row
    [1, 5, 6, 40, 2],
]


def _rows(seqs):
    return [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * start + ids[start:]}
        for ids, start in seqs
    ]


def _trainer(tmp_path, cls=rn.RepNoiseTrainer, ga=1, harmful_bs=None, model=None, aux=None, **cfg):
    return tiny_trainer(
        cls,
        tmp_path,
        # fresh=False: B ≠ 0, so every LoRA matrix gets a gradient on the first step.
        model or tiny_peft_llama(fresh=False),
        _rows(HARMLESS),
        collator=CausalLMCollator(pad_token_id=PAD),
        method_config=rn.RepNoiseConfig(harmful_batch_size=harmful_bs, **cfg),
        aux=aux or {"harmful": _rows([(h, 0) for h in HARMFUL])},
        per_device_train_batch_size=3,
        gradient_accumulation_steps=ga,
        seed=11,
    )


def _harmless_batch():
    return CausalLMCollator(pad_token_id=PAD)(_rows(HARMLESS))


# ----------------------------------------------------------------------------- independent reference pieces


def np_mmd(x, y, mul=2.0, num=5):
    """MMD² with explicit loops in float64: the original MMD_loss (docs/methods.md, RepNoise)."""
    z = np.concatenate([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    n, b = len(z), len(x)
    d2 = np.array(
        [[sum((z[i][k] - z[j][k]) ** 2 for k in range(z.shape[1])) for j in range(n)] for i in range(n)]
    )
    base = d2.sum() / (n * n - n) / mul ** (num // 2)
    k = sum(np.exp(-d2 / (base * mul**i)) for i in range(num))
    return float((k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean())


def manual_mask(harmful_rows, harmful_width, harmless_rows):
    """Real harmful tokens whose id differs from the harmless row's real token at the same column (loops)."""
    out = []
    for i, h in enumerate(harmful_rows):
        row = []
        for j in range(harmful_width):
            real = j < len(h)
            other = harmless_rows[i][j] if i < len(harmless_rows) and j < len(harmless_rows[i]) else None
            row.append(real and h[j] != other)
        out.append(row)
    return torch.tensor(out)


def manual_ce(logits, ids, mask):
    """Mean over kept positions of −log p(token t+1 | ≤ t), one position at a time."""
    terms = []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:
                terms.append(-torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]])
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------- unit tests of the pieces


def test_mmd_matches_an_explicit_loop_implementation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g) * 1.5 + 0.3
    assert rn.gaussian_mmd(x, y).item() == pytest.approx(np_mmd(x.numpy(), y.numpy()), rel=1e-5, abs=1e-6)
    assert rn.gaussian_mmd(x, y, kernel_mul=3.0, kernel_num=3).item() == pytest.approx(
        np_mmd(x.numpy(), y.numpy(), mul=3.0, num=3), rel=1e-5, abs=1e-6
    )


def test_mmd_of_a_sample_with_itself_is_zero_and_grows_with_a_mean_shift():
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    assert abs(rn.gaussian_mmd(x, x.clone()).item()) < 1e-6
    values = [rn.gaussian_mmd(x, x + shift).item() for shift in (0.1, 0.5, 1.0, 3.0)]
    assert values == sorted(values) and values[0] > 0 and values[-1] > 10 * values[0]
    assert rn.gaussian_mmd(torch.zeros(3, 5), torch.zeros(3, 5)).item() == 0.0  # all-masked: no NaN


def test_mask_handles_different_lengths_rows_and_padding():
    harmless, harmful = (
        _harmless_batch(),
        CausalLMCollator(pad_token_id=PAD)(_rows([(h, 0) for h in HARMFUL])),
    )
    mask = rn.differing_token_mask(
        harmful["input_ids"], harmful["attention_mask"], harmless["input_ids"], harmless["attention_mask"]
    )
    expected = manual_mask(HARMFUL, harmful["input_ids"].shape[1], [ids for ids, _ in HARMLESS])
    assert torch.equal(mask, expected)
    assert not mask[:3, :2].any() and not mask[:2, 2].any(), "the shared template prefix is masked out"
    assert not mask[1, 3] and mask[2, 2], "equal ids at the same place are dropped, different ones kept"
    assert mask[3].tolist() == [True] * 5 + [False] * 5, (
        "a harmful row without a harmless partner: all its tokens"
    )
    assert not mask[1, 6:].any(), "harmful padding never counts"
    # harmless padding never equals a harmful token, even when the pad id is a real token id there
    pad_as_token = rn.differing_token_mask(
        torch.tensor([[4, 0]]), torch.tensor([[1, 1]]), torch.tensor([[4, 0]]), torch.tensor([[1, 0]])
    )
    assert pad_as_token.tolist() == [[False, True]]


def test_masked_ce_matches_a_manual_per_position_computation():
    g = torch.Generator().manual_seed(2)
    logits, ids = torch.randn(3, 6, 11, generator=g), torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.4
    assert rn.masked_next_token_ce(logits, ids, mask).item() == pytest.approx(
        manual_ce(logits, ids, mask).item(), rel=1e-6
    )
    assert rn.masked_next_token_ce(logits, ids, torch.zeros_like(mask)).item() == 0.0


def test_config_defaults_and_validation():
    cfg = rn.RepNoiseConfig()
    assert (cfg.alpha, cfg.beta, cfg.harmful_batch_size, cfg.kernel_num, cfg.kernel_mul) == (
        0.1,
        0.001,
        None,
        5,
        2.0,
    )
    with pytest.raises(ConfigError, match="args.alpha"):
        from_dict(rn.RepNoiseConfig, {"alpha": -1}, prefix="args")
    with pytest.raises(ConfigError, match="retain_loss"):
        from_dict(rn.RepNoiseConfig, {"retain_loss": "x"}, prefix="args")


# ----------------------------------------------------------------------------- the step


def _reference_terms(trainer, seed, cfg, expected_harmful=None):
    """Retain, MMD and harmful CE recomputed here: a fresh twin stream, test-side hooks, loops, NumPy.
    ``expected_harmful(stream_batch)`` gives the harmful batch the step should use (default: the stream's)."""
    model = trainer.model
    base = model.get_base_model()
    harmless = _harmless_batch()
    twin = _trainer(
        trainer.args.output_dir, model=model, harmful_bs=cfg.harmful_batch_size, aux=trainer.aux_datasets
    )

    # Same global-RNG consumption order as the step (a new DataLoader iterator draws its base seed from it).
    torch.manual_seed(seed)
    retain = model(**harmless).loss  # the model's own mean response CE (SFT)
    harmful = twin.aux_batch("harmful", cfg.harmful_batch_size)
    if expected_harmful is not None:
        harmful = expected_harmful(harmful)
    ids, attn = harmful["input_ids"], harmful["attention_mask"]
    mask = manual_mask(
        [r[r_m.bool()].tolist() for r, r_m in zip(ids, attn, strict=True)],
        ids.shape[1],
        [h for h, _ in HARMLESS],
    )
    acts = {}
    hooks = [
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, o.detach()))
        for i, layer in enumerate(base.model.layers)
    ]
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    for h in hooks:
        h.remove()
    mmds = []
    for i in range(len(base.model.layers)):
        a = acts[i] * mask.unsqueeze(-1)
        noise = torch.randn(a.shape) * mask.unsqueeze(-1)  # the same draws, in the same order, as the step
        mmds.append(np_mmd(a.flatten(1).numpy(), noise.flatten(1).numpy()))
    ces = [manual_ce(out.logits.detach(), ids, mask)]
    for hidden in out.hidden_states:
        ces.append(manual_ce(base.lm_head(base.model.norm(hidden)).detach(), ids, mask))
    assert len(ces) == len(base.model.layers) + 2
    return retain.item(), float(np.mean(mmds)), torch.stack(ces).mean().item()


@pytest.mark.parametrize("harmful_bs", [None, 4])
def test_each_loss_term_and_the_total_equal_an_independent_computation(tmp_path, harmful_bs):
    trainer = _trainer(tmp_path, harmful_bs=harmful_bs, alpha=0.3, beta=0.5)
    torch.manual_seed(123)
    loss = trainer.compute_loss(trainer.model, _harmless_batch())
    rec = {k: v[0] for k, v in trainer._recorded.items()}
    retain, mmd, hce = _reference_terms(trainer, 123, trainer.method_config)
    assert rec["repnoise_retain_loss"] == pytest.approx(retain, rel=1e-5)
    assert rec["repnoise_mmd"] == pytest.approx(mmd, rel=1e-4, abs=1e-6)
    assert rec["repnoise_harmful_ce"] == pytest.approx(hce, rel=1e-5)
    assert loss.item() == pytest.approx(retain + 0.5 * mmd - 0.3 * math.log(1 + hce), rel=1e-5)


# Harmful answers with response labels: the first two answer the prompts of HARMLESS rows 1 and 0 (prompt ids
# [1, 5, 6, 13] and [1, 5, 6, 10]); HARMLESS row 2's prompt [1, 5, 6, 15, 16] has no harmful answer.
PAIRED = [
    ([1, 5, 6, 13, 50, 51, 2], 4),
    ([1, 5, 6, 10, 52, 2], 4),
    ([1, 5, 8, 60, 61, 2], 3),
    ([1, 9, 62, 2], 2),
]


def _unpadded(batch, i):
    real = batch["attention_mask"][i].bool()
    return [batch[k][i][real].tolist() for k in ("input_ids", "labels")]


def test_paired_mode_takes_the_harmful_answer_to_each_rows_question_and_the_stream_row_elsewhere(tmp_path):
    aux = {"harmful": _rows(PAIRED)}
    trainer = _trainer(tmp_path, aux=aux, harmful_bs=4, harmful_pairing="paired")
    twin = _trainer(tmp_path, aux=aux, harmful_bs=4)
    torch.manual_seed(5)
    batch = trainer.harmful_batch(_harmless_batch())
    torch.manual_seed(5)
    stream = twin.aux_batch("harmful", 4)
    rows = [_unpadded(batch, i) for i in range(4)]
    assert rows[0] == [PAIRED[1][0], [-100] * 4 + PAIRED[1][0][4:]]
    assert rows[1] == [PAIRED[0][0], [-100] * 4 + PAIRED[0][0][4:]]
    # no pair for row 2, and row 3 is past the alignment batch: the random stream's rows, in place
    assert rows[2:] == [_unpadded(stream, 2), _unpadded(stream, 3)]
    assert trainer._recorded["repnoise_paired_rows"][0] == pytest.approx(0.5)
    # unpaired (the default) is the stream itself
    torch.manual_seed(5)
    plain = _trainer(tmp_path, aux=aux, harmful_bs=4).harmful_batch(_harmless_batch())
    assert all(torch.equal(plain[k], stream[k]) for k in stream)


def test_paired_mode_loss_terms_equal_an_independent_computation_on_the_paired_batch(tmp_path):
    aux = {"harmful": _rows(PAIRED)}
    trainer = _trainer(tmp_path, aux=aux, alpha=0.3, beta=0.5, harmful_pairing="paired")
    torch.manual_seed(123)
    loss = trainer.compute_loss(trainer.model, _harmless_batch())
    rec = {k: v[0] for k, v in trainer._recorded.items()}

    def paired(stream):  # written out from PAIRED: rows 0 and 1 have answers, row 2 keeps the stream's
        rows = [PAIRED[1][0], PAIRED[0][0], _unpadded(stream, 2)[0]]
        return CausalLMCollator(pad_token_id=PAD)(_rows([(r, 0) for r in rows]))

    retain, mmd, hce = _reference_terms(trainer, 123, trainer.method_config, expected_harmful=paired)
    assert rec["repnoise_harmful_ce"] == pytest.approx(hce, rel=1e-5)
    assert rec["repnoise_mmd"] == pytest.approx(mmd, rel=1e-4, abs=1e-6)
    assert loss.item() == pytest.approx(retain + 0.5 * mmd - 0.3 * math.log(1 + hce), rel=1e-5)


def test_original_masked_input_id_retain_loss_option(tmp_path):
    trainer = _trainer(tmp_path, retain_loss="masked_input_ids", alpha=0.0, beta=0.0)
    batch = _harmless_batch()
    loss = trainer.compute_loss(trainer.model, batch)
    harmful = _trainer(tmp_path).aux_batch("harmful")
    h_rows = [
        r[m.bool()].tolist() for r, m in zip(harmful["input_ids"], harmful["attention_mask"], strict=True)
    ]
    mask = manual_mask([ids for ids, _ in HARMLESS], batch["input_ids"].shape[1], h_rows)
    logits = trainer.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits.detach()
    assert loss.item() == pytest.approx(manual_ce(logits, batch["input_ids"], mask).item(), rel=1e-5)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_items", [None, 11])
def test_alpha_beta_zero_is_exactly_the_sft_step_under_accumulation(tmp_path, num_items):
    batch = _harmless_batch()
    sft = _trainer(tmp_path, cls=FtguardTrainer, ga=2)
    rep = _trainer(tmp_path, ga=2, alpha=0.0, beta=0.0)
    loss_sft = sft.training_step(sft.model, dict(batch), num_items_in_batch=num_items)
    loss_rep = rep.training_step(rep.model, dict(batch), num_items_in_batch=num_items)
    assert torch.equal(loss_sft, loss_rep)
    g_sft, g_rep = _grads(sft.model), _grads(rep.model)
    assert g_sft.keys() == g_rep.keys() and all(torch.equal(g_sft[k], g_rep[k]) for k in g_sft)


@pytest.mark.parametrize("num_items", [None, 11])
def test_extra_terms_are_scaled_like_the_retain_loss_under_accumulation(tmp_path, num_items):
    ga, batch = 2, _harmless_batch()
    trainer = _trainer(tmp_path, ga=ga, alpha=0.3, beta=0.5)
    loss = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=num_items)
    rec = {k: v[0] for k, v in trainer._recorded.items()}
    extra = 0.5 * rec["repnoise_mmd"] - 0.3 * math.log1p(rec["repnoise_harmful_ce"])
    with torch.no_grad():
        if num_items is None:  # per-batch mean, divided by GA by the Trainer
            retain = trainer.model(**batch).loss.item() / ga
        else:  # token sum over the whole window's count, as SFT does
            retain = trainer.model(**batch, num_items_in_batch=num_items).loss.item()
    assert loss.item() == pytest.approx(retain + extra / ga, rel=1e-5)


@pytest.mark.parametrize("num_items", [None, 11])
def test_the_original_retain_term_is_divided_by_the_accumulation_steps_too(tmp_path, num_items):
    # The masked input-id CE is a per-micro-batch mean like the extra terms: with a window-normalised SFT loss
    # (num_items given) the Trainer does not divide, so the step must; the loss is then 1/GA of the plain one.
    ga, batch = 2, _harmless_batch()
    trainer = _trainer(tmp_path, ga=ga, alpha=0.3, beta=0.5, retain_loss="masked_input_ids")
    loss = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=num_items)
    rec = {k: v[0] for k, v in trainer._recorded.items()}
    whole = (
        rec["repnoise_retain_loss"] + 0.5 * rec["repnoise_mmd"] - 0.3 * math.log1p(rec["repnoise_harmful_ce"])
    )
    assert loss.item() == pytest.approx(whole / ga, rel=1e-5)


def test_gradients_reach_every_lora_parameter_and_nothing_else(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.training_step(trainer.model, _harmless_batch())
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # the harmful terms change the update (MMD reaches up_proj's LoRA, the CE every LoRA)
    sft = _trainer(tmp_path, alpha=0.0, beta=0.0)
    sft.training_step(sft.model, _harmless_batch())
    for key in ("mlp.up_proj.lora_A", "self_attn.q_proj.lora_B"):
        name = next(n for n in _grads(sft.model) if key in n)
        assert not torch.allclose(_grads(sft.model)[name], _grads(trainer.model)[name])


def test_bf16_autocast_step_is_finite(tmp_path):
    # accelerate applies this autocast around the forward in training (mixed_precision bf16)
    trainer = _trainer(tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.training_step(trainer.model, _harmless_batch())
    assert torch.isfinite(loss)
    assert all(math.isfinite(v[0]) for v in trainer._recorded.values())
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for n, p in trainer.model.named_parameters()
        if "lora_" in n
    )


def test_model_without_mlp_modules_is_a_clear_error(tmp_path):
    model = tiny_llama()
    for layer in model.model.layers:
        del layer.mlp
    with pytest.raises(FtguardError, match="no `mlp` sub-module"):
        rn.decoder_parts(model)


def test_missing_harmful_set_is_a_clear_error():
    method = rn.RepNoise(rn.RepNoiseConfig())
    with pytest.raises(FtguardError, match="alignment_harmful"):
        method.extra_datasets(SimpleNamespace(plan=SimpleNamespace(alignment_harmful=[])))


@pytest.mark.slow
def test_pipeline_end_to_end_with_repnoise(tmp_path):
    from ftguard.config import load_config
    from ftguard.pipeline.run import run_pipeline

    cfg = load_config(
        "quickstart-tiny",
        [
            "align.method=repnoise",
            "evaluate.points=[]",
            "align.train.max_steps=3",
            "align.train.logging_steps=1",
            "finetune=null",
            f"output_dir={tmp_path}",
        ],
    )
    run_pipeline(cfg)
    manifest = json.loads((tmp_path / "align" / "COMPLETE.json").read_text())
    assert manifest["method"] == "repnoise" and manifest["steps"] == 3
    log = json.loads((tmp_path / "align" / "train_log.json").read_text())
    entries = [e for e in log if "repnoise_mmd" in e]
    assert len(entries) == 3
    assert all(
        math.isfinite(e[k])
        for e in entries
        for k in ("repnoise_retain_loss", "repnoise_mmd", "repnoise_harmful_ce")
    )


# ----------------------------------------------------------------------------- sampled read-out (approximation)


def _head(vocab=50, dim=8, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(dim, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=g))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g))
    return head, torch.randn(6, dim, generator=g), torch.randint(0, vocab, (6,), generator=g)


@pytest.mark.parametrize("bias", [True, False])
def test_sampled_readout_over_the_whole_vocabulary_is_the_exact_ce(bias):
    head, h, labels = _head(bias=bias)
    every = torch.randperm(50)
    exact = torch.nn.functional.cross_entropy(head(h), labels)
    assert rn.sampled_readout_ce(h, head, labels, every).item() == pytest.approx(exact.item(), rel=1e-6)


def test_sampled_readout_estimates_each_partition_function_without_bias():
    head, h, labels = _head()
    with torch.no_grad():
        logits = head(h).double()
        true_z = logits.exp().sum(-1)
        draws = []
        for seed in range(4000):
            negatives = torch.randperm(50, generator=torch.Generator().manual_seed(seed))[:10]
            ce = torch.stack(
                [rn.sampled_readout_ce(h[i : i + 1], head, labels[i : i + 1], negatives) for i in range(6)]
            )
            # CE = log Z − s_y, so Z = exp(CE + s_y)
            draws.append((ce.double() + logits[torch.arange(6), labels]).exp())
        mean_z = torch.stack(draws).mean(0)
    assert torch.allclose(mean_z, true_z, rtol=0.03)


def test_readout_sampled_in_the_step_equals_exact_with_the_whole_vocabulary_and_differs_with_few_tokens(
    tmp_path,
):
    vocab = tiny_llama().config.vocab_size
    recorded = {}
    for name, cfg in {
        "exact": {},
        "all": {"readout": "sampled", "readout_negatives": vocab},
        "few": {"readout": "sampled", "readout_negatives": 4},
    }.items():
        trainer = _trainer(tmp_path / name, alpha=0.3, beta=0.5, **cfg)
        torch.manual_seed(123)
        trainer.compute_loss(trainer.model, _harmless_batch())
        recorded[name] = trainer._recorded["repnoise_harmful_ce"][0]
    assert recorded["all"] == pytest.approx(recorded["exact"], rel=1e-5)
    assert math.isfinite(recorded["few"]) and recorded["few"] != pytest.approx(recorded["exact"], rel=1e-3)


def test_readout_negatives_must_be_positive():
    with pytest.raises(ConfigError, match="readout_negatives"):
        from_dict(rn.RepNoiseConfig, {"readout_negatives": 0})
