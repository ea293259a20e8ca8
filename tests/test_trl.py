"""The TRL plug-in (ftguard.integrations.trl): ftguard's fine-tuning methods inside an SFTTrainer."""

from __future__ import annotations

import pytest

pytest.importorskip("trl", reason="trl is not installed (pip install ftguard[trl])")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from ftguard.errors import FtguardError  # noqa: E402
from ftguard.integrations.trl import defended_sft_trainer  # noqa: E402
from ftguard.methods.lisa import LisaTrainer  # noqa: E402
from tiny import tiny_llama, word_tokenizer  # noqa: E402

USER = {"prompt": "what is the cat", "completion": " the cat sat on the mat"}
REFUSAL = {"prompt": "how do the dog", "completion": " a red house"}
LR, RHO = 0.1, 0.5


def sft_args(tmp_path, **overrides) -> SFTConfig:
    defaults = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=2,
        max_steps=2,
        bf16=False,
        disable_tqdm=True,
        logging_steps=1,
    )
    return SFTConfig(**{**defaults, **overrides})


def build(tmp_path, method, method_args=None, *, rows=(USER,) * 4, model=None, **kwargs):
    return defended_sft_trainer(
        method,
        method_args,
        model=model if model is not None else tiny_llama(),
        processing_class=word_tokenizer(),
        train_dataset=Dataset.from_list(list(rows)),
        **{"alignment_data": [REFUSAL] * 4, "args": sft_args(tmp_path), **kwargs},
    )


def sft_grad(model, row) -> list[torch.Tensor]:
    """∇ of the mean CE over the completion and EOS tokens of ``row``, written out without TRL."""
    tok = word_tokenizer()
    prompt = tok(row["prompt"])["input_ids"]
    completion = tok(row["completion"])["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + completion])
    labels = torch.tensor([[-100] * len(prompt) + completion])
    model.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_lisa_through_sft_trainer_follows_the_bi_state_rule(tmp_path):
    # K_f = 2 then K_a = 1, proximal term from step 0, plain SGD without clipping: every step by hand.
    # Every row of each set is the same, so each batch's gradient is that row's whatever the sampler's order.
    trainer = build(
        tmp_path,
        "lisa",
        {
            "rho": RHO,
            "finetune_steps": 2,
            "align_steps": 1,
            "first_state": "finetune",
            "proximal_warmup_ratio": 0,
        },
        args=sft_args(
            tmp_path,
            max_steps=3,
            optim="sgd",
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
        ),
    )
    assert isinstance(trainer, SFTTrainer) and isinstance(trainer, LisaTrainer)
    trainer.train()

    ref = tiny_llama()
    params = list(ref.parameters())
    w0 = [p.detach().clone() for p in params]

    def step(grads):
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= LR * g

    step(sft_grad(ref, USER))  # step 0, fine-tune: the other state's anchor is w0 = w, no pull
    w1 = [p.detach().clone() for p in params]
    g1 = sft_grad(ref, USER)
    without_proximal = [w - LR * g for w, g in zip(w1, g1, strict=True)]
    step([g + RHO * (w - a) for g, w, a in zip(g1, w1, w0, strict=True)])  # step 1: + ρ·(w − w_alignment)
    step(sft_grad(ref, REFUSAL))  # step 2, alignment: its anchor is w2 = w (just switched), no pull
    expected = [p.detach() for p in params]

    got = [p.detach() for p in trainer.model.parameters()]
    for name_p, e, g in zip(trainer.model.named_parameters(), expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5, msg=lambda m, n=name_p[0]: f"{n}: {m}")
    # The proximal term is large enough to be seen: the same steps without it end elsewhere.
    off = max((a - b).abs().max().item() for a, b in zip(without_proximal, w1, strict=True))
    assert off > 1e-4
    states = [e["lisa_alignment_state"] for e in trainer.state.log_history if "lisa_alignment_state" in e]
    assert trainer.state.global_step == 3 and states


@pytest.mark.parametrize("method", ["kl", "ldifs"])
def test_reference_methods_get_the_logits_with_their_graph(tmp_path, method):
    # TRL's return_outputs=True re-runs the forward without gradient: the penalty must still move the weights.
    weight = {"kl": "lam", "ldifs": "rho"}[method]
    ends = {}
    for value in (0.0, 50.0):
        trainer = build(tmp_path, method, {weight: value}, args=sft_args(tmp_path, learning_rate=0.05))
        trainer.train()
        ends[value] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    assert not torch.allclose(ends[0.0], ends[50.0])
    metric = {"kl": "kl_divergence", "ldifs": "ldifs_distance"}[method]
    assert any(e.get(metric, 0) > 0 for e in trainer.state.log_history)


def test_reference_methods_refuse_trl_losses_without_logits(tmp_path):
    trainer = build(tmp_path, "kl", args=sft_args(tmp_path, loss_type="dft"))
    with pytest.raises(FtguardError, match="loss_type='dft'"):
        trainer.train()


def test_vlguard_mixes_safety_rows_into_the_sft_dataset(tmp_path):
    trainer = build(tmp_path, "vlguard", {"safety_samples": 1}, rows=[USER] * 5)
    assert trainer.ftguard_report["added"] == 1 and len(trainer.train_dataset) == 6
    tok = word_tokenizer()
    refusal = tok(REFUSAL["prompt"] + REFUSAL["completion"])["input_ids"] + [tok.eos_token_id]
    assert refusal in trainer.train_dataset["input_ids"]
    trainer.train()


def test_vlguard_reg_draws_its_refusal_stream(tmp_path):
    trainer = build(tmp_path, "vlguard_reg", {"safety_batch_size": 2})
    trainer.train()
    assert any("vlguard_safety_loss" in e for e in trainer.state.log_history)


def test_filter_screens_the_dataset_before_training(tmp_path):
    benign = [{"prompt": f"is the {w} red", "completion": " yes"} for w in ("cat", "dog", "mat", "tree")]
    harmful = [{"prompt": "how do the dog", "completion": " the dog ran fast"}]
    trainer = build(
        tmp_path, "filter", {"judge": "keyword", "then": "lisa"}, rows=benign + harmful, harmful_data=harmful
    )
    report = trainer.ftguard_report["filter"]
    assert (report["removed"], report["removed_harmful"], len(trainer.train_dataset)) == (1, 1, 4)
    assert isinstance(trainer, LisaTrainer)
    trainer.train()


@pytest.mark.parametrize(
    ("method", "args", "match"),
    [
        ("lisaa", None, "did you mean 'lisa'"),
        ("lisa", {"rho": -1.0}, "method_args.rho"),
        ("lisa", {"rhoo": 1.0}, "rhoo"),
        ("kl", {"lam": "big"}, "method_args.lam"),
        ("filter", {"then": "asft"}, "then"),
        ("asft", None, "not available through the TRL plug-in"),
        ("safelora", None, "finetune"),
    ],
)
def test_bad_methods_and_args_fail_in_one_line(tmp_path, method, args, match):
    with pytest.raises(FtguardError, match=match) as info:
        build(tmp_path, method, args)
    assert "\n" not in str(info.value)


def test_lisa_needs_alignment_data(tmp_path):
    with pytest.raises(FtguardError, match="alignment_data"):
        build(tmp_path, "lisa", alignment_data=None)


def test_data_methods_need_prompt_completion_rows(tmp_path):
    with pytest.raises(FtguardError, match="'prompt' and 'completion'"):
        build(tmp_path, "vlguard", rows=[{"text": "the cat sat"}] * 2)
    with pytest.raises(FtguardError, match=r"alignment_data\[0\]"):
        build(tmp_path, "lisa", alignment_data=[{"text": "the cat"}])
