"""Vlguard (docs/methods.md, Vlguard): exact mixing counts (add / replace), reproducibility, disjointness and
errors; the regularised form's gradient ∇ℓ + λ∇f against a hand computation, with and without
gradient accumulation."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ftguard.data.example import Example
from ftguard.data.mix import build_harmful_mix
from ftguard.data.plan import DataPlan
from ftguard.errors import FtguardError
from ftguard.methods.vlguard import Vlguard, VlguardReg, VlguardRegConfig, VlguardRegTrainer
from ftguard.schema import ConfigError
from ftguard.training.trainer import FtguardTrainer
from tiny import collate, tiny_lora_llama, tiny_trainer

SEQ = 7


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------- data mixing


def _examples(prefix: str, n: int, output: str) -> list[Example]:
    return [
        Example(instruction=f"{prefix} prompt {i}", output=output, source=f"{prefix}#{i}") for i in range(n)
    ]


def _plan(n_alignment: int = 30, seed: int = 43, n: int = 20, p: float = 0.1) -> DataPlan:
    plan = DataPlan(task=SimpleNamespace(name="toy"), seed=seed)
    plan.alignment = _examples("safe", n_alignment, "I cannot help with that.")
    plan.attack_pool = _examples("harm", 5, "harmful answer")
    plan.eval_harmful = _examples("eval", 5, "")
    benign = _examples("task", 40, "positive")
    plan.mixes[p], plan.mix_reports[p] = build_harmful_mix(benign, plan.attack_pool, n=n, p=p, seed=seed)
    return plan


def _kinds(examples: list[Example]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for ex in examples:
        kind = ex.source.split("#")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _mix(plan: DataPlan, **cfg):
    method = Vlguard(Vlguard.parse_args(cfg))
    method.prepare_data(plan, None, "finetune")
    return method.train_examples(plan.mixes[0.1], plan)


def test_add_mode_puts_the_first_safety_samples_on_top_of_the_upload():
    plan = _plan()
    mixed, report = _mix(plan, safety_samples=5, mode="add")
    assert _kinds(mixed) == {"harm": 2, "task": 18, "safe": 5}
    assert sorted(ex.source for ex in mixed if ex.source.startswith("safe")) == [
        f"safe#{i}" for i in range(5)
    ]
    assert set(plan.mixes[0.1]) <= set(mixed), "nothing of the upload is lost"
    assert report == {
        "mode": "add",
        "added": 5,
        "replaced": 0,
        "n_before": 20,
        "n_after": 25,
        "seed": 43,
        "safety_source": "data.alignment",
    }
    keys = [ex.prompt_key for ex in mixed]
    assert len(keys) == len(set(keys)), "no duplicate prompt"
    assert not {ex.prompt_key for ex in plan.attack_pool} & {
        ex.prompt_key for ex in mixed if ex.source.startswith("safe")
    }


def test_replace_mode_keeps_every_harmful_sample_and_swaps_benign_ones():
    plan = _plan()
    mixed, report = _mix(plan, safety_samples=5, mode="replace")
    assert _kinds(mixed) == {"harm": 2, "task": 13, "safe": 5}
    assert {ex for ex in plan.mixes[0.1] if ex.source.startswith("harm")} <= set(mixed)
    assert set(mixed) - set(plan.mixes[0.1]) == set(plan.alignment[:5])
    assert (report["added"], report["replaced"], report["n_before"], report["n_after"]) == (5, 5, 20, 20)


def test_the_mix_is_reproducible_from_the_run_seed_and_changes_with_it():
    a, _ = _mix(_plan(seed=43), safety_samples=5, mode="replace")
    b, _ = _mix(_plan(seed=43), safety_samples=5, mode="replace")
    c, report = _mix(_plan(seed=44), safety_samples=5, mode="replace")
    assert a == b
    assert a != c and report["seed"] == 44


def test_duplicate_safety_prompts_and_prompts_already_uploaded_are_skipped():
    plan = _plan()
    uploaded = plan.mixes[0.1][0]
    plan.alignment = [plan.alignment[0], plan.alignment[0], uploaded, *plan.alignment[1:]]
    mixed, _ = _mix(plan, safety_samples=3)
    keys = [ex.prompt_key for ex in mixed]
    assert len(keys) == len(set(keys)) == 23
    assert sorted(ex.source for ex in mixed if ex.source.startswith("safe")) == ["safe#0", "safe#1", "safe#2"]


def test_asking_for_too_many_samples_fails_with_what_to_change():
    with pytest.raises(
        FtguardError, match="asks for 31 safety samples but the safety set has 30.*lower safety_samples"
    ):
        _mix(_plan(n_alignment=30), safety_samples=31)
    with pytest.raises(FtguardError, match="replace 19 benign samples but the upload has 18.*mode: add"):
        _mix(_plan(n_alignment=30), safety_samples=19, mode="replace")
    _mix(_plan(n_alignment=30), safety_samples=18, mode="replace")  # every benign sample replaced: allowed
    with pytest.raises(FtguardError, match="'alignment', which is empty"):
        _mix(_plan(n_alignment=0), safety_samples=1)


def test_a_configured_safety_source_is_loaded_checked_and_used():
    plan = _plan()
    plan.root = "bundled"
    spec = {"source": "safety_tuned_llamas", "split": "train", "n": 10}
    mixed, report = _mix(plan, safety_samples=4, safety_source=spec)
    assert report["safety_source"] == "args.safety_source" and report["added"] == 4
    assert len(plan.extra["vlguard_safety"]) == 10 and "vlguard_safety" in plan.sources
    assert _kinds(mixed)["safety_tuned_llamas/train"] == 4
    # A source that overlaps the attack prompts is refused before any training.
    plan.attack_pool = [*plan.attack_pool, plan.extra["vlguard_safety"][0]]
    with pytest.raises(FtguardError, match="share 1 prompt"):
        _mix(plan, safety_samples=4, safety_source=spec)


def test_mixing_config_defaults_and_bad_values():
    cfg = Vlguard.parse_args({})
    assert (cfg.safety_samples, cfg.mode, cfg.safety_source) == (100, "add", None)
    assert Vlguard.trainer_class is None, "the mixing form trains with plain SFT"
    with pytest.raises(ConfigError, match="'finetune.args.mode' must be one of 'add' | 'replace'"):
        Vlguard.parse_args({"mode": "swap"}, prefix="finetune.args")
    with pytest.raises(ConfigError, match="safety_samples"):
        Vlguard.parse_args({"safety_samples": 0})
    with pytest.raises(ConfigError, match="'args.safety_source.split'"):
        Vlguard.parse_args({"safety_source": {"split": 3}})


# ----------------------------------------------------------------------- the regularised form


def _rows(n: int, seed: int, prompt: int = 2) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, SEQ), generator=g)
    return [
        {
            "input_ids": r.tolist(),
            "attention_mask": [1] * SEQ,
            "labels": [-100] * prompt + r[prompt:].tolist(),
        }
        for r in ids
    ]


TRAIN_ARGS = {"per_device_train_batch_size": 4, "max_steps": 1, "seed": 3}


def _trainer(tmp_path, model=None, ga: int = 1, **cfg) -> VlguardRegTrainer:
    return tiny_trainer(
        VlguardRegTrainer,
        tmp_path,
        model if model is not None else tiny_lora_llama(),
        _rows(8, 1),
        method_config=VlguardRegConfig(**cfg),
        aux={"safety": _rows(12, 2)},
        gradient_accumulation_steps=ga,
        **TRAIN_ARGS,
    )


def _spy_safety(trainer) -> list[tuple[int | None, dict]]:
    drawn, original = [], trainer.aux_batch

    def aux_batch(name, batch_size=None):
        batch = original(name, batch_size)
        drawn.append((batch_size, batch))
        return batch

    trainer.aux_batch = aux_batch
    return drawn


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _grad(model, weights, batch, reduction: str = "mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Response-token CE (mean, or sum) and its gradient at ``weights``, from the logits of a functional call."""
    leaves = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
    logits = functional_call(
        model, leaves, (), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ).logits
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction=reduction
    )
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads, strict=True))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_regularised_gradient_is_task_gradient_plus_lambda_refusal_gradient(tmp_path):
    lam = 0.7
    trainer = _trainer(tmp_path, lam=lam)
    drawn = _spy_safety(trainer)
    model = trainer.model
    forwards, backwards = [], []
    model.base_model.model.lm_head.register_forward_hook(lambda *a: forwards.append(1))
    backward = trainer.accelerator.backward
    trainer.accelerator.backward = lambda loss, **kw: (backwards.append(1), backward(loss, **kw))
    w = _weights(model)
    x = collate(_rows(4, 11))
    loss = trainer.training_step(model, x)
    assert (len(forwards), len(backwards)) == (2, 1), "two forwards, one backward through both"

    ((bs, safety),) = drawn
    assert bs == 4 and safety["input_ids"].shape[0] == 4, "Booster's hard-coded refusal batch of 4"
    ell, g_ell = _grad(model, w, x)
    f, g_f = _grad(model, w, safety)
    _assert_close(_grads(model), {n: g_ell[n] + lam * g_f[n] for n in w})
    torch.testing.assert_close(loss, ell + lam * f, rtol=1e-5, atol=1e-6)
    assert trainer._recorded["vlguard_safety_loss"] == [pytest.approx(f.item(), rel=1e-5)]


def test_lambda_zero_gives_exactly_the_sft_gradient(tmp_path):
    model = tiny_lora_llama()
    sft_model = copy.deepcopy(model)
    trainer = _trainer(tmp_path / "v", model=model, lam=0.0)
    sft = tiny_trainer(FtguardTrainer, tmp_path / "s", sft_model, _rows(8, 1), **TRAIN_ARGS)
    x = collate(_rows(4, 11))
    assert torch.equal(trainer.training_step(model, x), sft.training_step(sft_model, x))
    for (n, a), b in zip(_grads(model).items(), _grads(sft_model).values(), strict=True):
        assert torch.equal(a, b), n


def test_gradient_accumulation_2_is_the_mean_of_two_single_step_gradients(tmp_path):
    lam = 0.7
    trainer = _trainer(tmp_path, ga=2, lam=lam)
    drawn = _spy_safety(trainer)
    model = trainer.model
    w = _weights(model)
    x1, x2 = collate(_rows(4, 11)), collate(_rows(4, 12))
    trainer.training_step(model, x1)
    trainer.training_step(model, x2)

    (_, s1), (_, s2) = drawn
    expected = {}
    g1, g2, f1, f2 = (
        _grad(model, w, x1)[1],
        _grad(model, w, x2)[1],
        _grad(model, w, s1)[1],
        _grad(model, w, s2)[1],
    )
    for n in w:
        expected[n] = (g1[n] + lam * f1[n] + g2[n] + lam * f2[n]) / 2
    _assert_close(_grads(model), expected)


def test_token_normalised_accumulation_scales_the_refusal_term_by_one_over_ga(tmp_path):
    """With num_items_in_batch, the Trainer normalises ℓ by the response tokens of the whole accumulated batch and
    does not divide by GA; λ·f (a per-batch mean) must still enter as the mean over the micro-batches."""
    lam = 0.7
    trainer = _trainer(tmp_path, ga=2, lam=lam)
    assert trainer.model_accepts_loss_kwargs, "the token-normalised path is what this test exercises"
    drawn = _spy_safety(trainer)
    model = trainer.model
    w = _weights(model)
    x1, x2 = collate(_rows(4, 11, prompt=2)), collate(_rows(4, 12, prompt=4))  # different token counts
    tokens = int((x1["labels"][:, 1:] != -100).sum() + (x2["labels"][:, 1:] != -100).sum())
    trainer.training_step(model, x1, num_items_in_batch=torch.tensor(tokens))
    trainer.training_step(model, x2, num_items_in_batch=torch.tensor(tokens))

    (_, s1), (_, s2) = drawn
    sum1, sum2 = _grad(model, w, x1, "sum")[1], _grad(model, w, x2, "sum")[1]
    f1, f2 = _grad(model, w, s1)[1], _grad(model, w, s2)[1]
    _assert_close(_grads(model), {n: (sum1[n] + sum2[n]) / tokens + lam * (f1[n] + f2[n]) / 2 for n in w})


def test_regularised_config_defaults_are_boosters_and_the_pool_is_the_alignment_set():
    cfg = VlguardReg.parse_args({})
    assert (cfg.lam, cfg.safety_batch_size, cfg.safety_samples, cfg.safety_source) == (0.1, 4, None, None)
    with pytest.raises(ConfigError, match="lam"):
        VlguardReg.parse_args({"lam": -0.1})
    with pytest.raises(ConfigError, match="unknown key 'args.mode'"):
        VlguardReg.parse_args({"mode": "add"})
    plan = _plan(n_alignment=6)
    ctx = SimpleNamespace(stage="finetune", plan=plan, tokenize=lambda exs: ("tok", exs))
    assert VlguardReg(VlguardRegConfig(safety_samples=2)).extra_datasets(ctx) == {
        "safety": ("tok", plan.alignment[:2])
    }
    assert VlguardReg(VlguardRegConfig()).extra_datasets(ctx) == {"safety": ("tok", plan.alignment)}
    with pytest.raises(FtguardError, match="finetune.args.safety_samples = 7 but data.alignment has 6"):
        VlguardReg(VlguardRegConfig(safety_samples=7)).prepare_data(plan, None, "finetune")


# ----------------------------------------------------------------------- packaged configs and the pipeline


def test_packaged_vlguard_configs_load():
    from ftguard.config import load_config

    for name in ("vlguard-tiny", "vlguard-smollm2"):
        cfg = load_config(name)
        assert cfg.finetune.method == "vlguard" and cfg.adapter.topology == "double", name
    load_config("vlguard-tiny", ["finetune.method=vlguard_reg", "finetune.args={}"])


@pytest.mark.slow
def test_pipeline_runs_both_vlguard_forms_end_to_end(tmp_path):
    from ftguard.config import load_config
    from ftguard.pipeline.run import run_pipeline

    common = [
        "evaluate.points=[]",
        "align.train.max_steps=2",
        "finetune.train.max_steps=2",
        "finetune.train.logging_steps=1",
    ]
    run_pipeline(load_config("vlguard-tiny", [*common, f"output_dir={tmp_path / 'mix'}"]))
    manifest = json.loads((tmp_path / "mix" / "finetune" / "COMPLETE.json").read_text())
    assert manifest["method"] == "vlguard" and manifest["steps"] == 2
    data = manifest["method_data"]
    assert (data["mode"], data["added"], data["replaced"], data["n_before"], data["n_after"]) == (
        "add",
        8,
        0,
        64,
        72,
    )
    assert manifest["data"]["n"] == 72, "the Trainer trains on the mixed set"

    run_pipeline(
        load_config(
            "vlguard-tiny",
            [
                *common,
                "finetune.method=vlguard_reg",
                "finetune.args={safety_samples: 16}",
                f"output_dir={tmp_path / 'reg'}",
            ],
        )
    )
    logs = [
        e for e in json.loads((tmp_path / "reg" / "finetune" / "train_log.json").read_text()) if "loss" in e
    ]
    assert len(logs) == 2 and all(e["vlguard_safety_loss"] > 0 for e in logs)
