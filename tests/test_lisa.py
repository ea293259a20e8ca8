"""Lisa and BSO (docs/methods.md, Lisa and BSO): the schedule, the proximal gradient against a hand
computation, anchors, which batches are trained on, gradient accumulation, DDP, resume, data and configs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call
from transformers import TrainerCallback

import ftguard.methods.lisa  # noqa: F401  (registers "lisa" and "bso")
from ftguard.errors import FtguardError
from ftguard.methods.lisa import (
    ALIGNMENT,
    BSO,
    FINETUNE,
    BsoConfig,
    Lisa,
    LisaConfig,
    LisaTrainer,
    schedule_state,
)
from ftguard.schema import ConfigError
from ftguard.training.trainer import METHOD_TENSORS_FILE
from tiny import collate, tiny_lora_llama, tiny_trainer

SEQ = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, seed: int) -> list[dict[str, list[int]]]:
    """Rows with 1–6 response tokens, so that token-count and per-batch-mean normalisations differ."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, SEQ), generator=g)
    prompt = torch.randint(2, SEQ, (n,), generator=g)
    return [
        {
            "input_ids": r.tolist(),
            "attention_mask": [1] * SEQ,
            "labels": [-100] * int(k) + r[int(k) :].tolist(),
        }
        for r, k in zip(ids, prompt, strict=True)
    ]


def _batch(seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    return collate(_rows(n, seed))


def _trainer(
    tmp_path,
    *,
    cls=LisaConfig,
    bs: int = 4,
    ga: int = 1,
    max_steps: int = 10,
    model=None,
    n_align: int = 12,
    args: dict | None = None,
    **cfg,
) -> LisaTrainer:
    cfg = {"align_steps": 2, "finetune_steps": 3, "proximal_warmup_ratio": 0.0, **cfg}
    return tiny_trainer(
        LisaTrainer,
        tmp_path,
        model if model is not None else tiny_lora_llama(),
        _rows(16, 1),
        method_config=cls(**cfg),
        aux={"alignment": _rows(n_align, 2)},
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_steps=max_steps,
        seed=3,
        logging_steps=1,
        learning_rate=1e-2,
        disable_tqdm=True,
        **(args or {}),
    )


def _spy_alignment(trainer) -> list[dict]:
    drawn, original = [], trainer.aux_batch

    def aux_batch(name, batch_size=None):
        batch = original(name, batch_size)
        drawn.append(batch)
        return batch

    trainer.aux_batch = aux_batch
    return drawn


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _ce_grad(model, weights, batch, reduce: str = "mean") -> dict[str, torch.Tensor]:
    """Gradient of the response-token CE at ``weights`` (mean, or sum over tokens), by a functional call."""
    leaves = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
    loss = functional_call(model, leaves, (), {k: v.clone() for k, v in batch.items()}).loss
    if reduce == "sum":
        loss = loss * batch["labels"][:, 1:].ne(-100).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def _assert_close(actual: dict, expected: dict, **tol) -> None:
    assert actual.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], **({"rtol": 1e-4, "atol": 1e-6} | tol), msg=n)


def _set_anchors(trainer, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Anchors away from w (different for the two states), so that both proximal gradients are non-zero."""
    g = torch.Generator().manual_seed(seed)
    w = _weights(trainer.model)
    anchors = {
        s: {n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in w.items()}
        for s in (ALIGNMENT, FINETUNE)
    }
    trainer.anchors = {s: [a.clone() for a in anchors[s].values()] for s in anchors}
    return anchors


def _letters(states) -> str:
    return "".join("A" if s == ALIGNMENT else "F" for s in states)


# ----------------------------------------------------------------------- the schedule


def test_schedule_alternates_by_step_counts_starting_with_alignment():
    cfg = LisaConfig(align_steps=2, finetune_steps=3)
    assert _letters(schedule_state(t, cfg)[0] for t in range(12)) == "AAFFFAAFFFAA"
    assert [schedule_state(t, cfg)[1] for t in range(7)] == [0, 1, 0, 1, 2, 0, 1]
    cfg = LisaConfig(align_steps=2, finetune_steps=3, first_state=FINETUNE)
    assert _letters(schedule_state(t, cfg)[0] for t in range(12)) == "FFFAAFFFAAFF"
    paper = LisaConfig()  # K_a = 100, K_f = 900: 10% alignment steps
    assert [schedule_state(t, paper)[0] for t in (0, 99, 100, 999, 1000, 1099, 1100)] == [
        ALIGNMENT,
        ALIGNMENT,
        FINETUNE,
        FINETUNE,
        ALIGNMENT,
        ALIGNMENT,
        FINETUNE,
    ]


@pytest.mark.parametrize(("ratio", "off"), [(0.2, 2), (0.35, 4), (0.0, 0)])
def test_training_logs_the_state_and_keeps_the_proximal_term_off_during_warm_up(tmp_path, ratio, off):
    trainer = _trainer(tmp_path, max_steps=10, proximal_warmup_ratio=ratio, rho=1.0)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert _letters(ALIGNMENT if e["lisa_alignment_state"] == 1.0 else FINETUNE for e in logs) == "AAFFFAAFFF"
    # Just after a switch the other state's anchor is the current weights: the drift is exactly 0 there.
    switches = {0, 2, 5, 7}
    assert [e["lisa_drift"] == 0.0 for e in logs] == [t in switches for t in range(10)]
    for t, e in enumerate(logs):
        if t < off or t in switches:
            assert e["lisa_proximal"] == 0.0, t
        else:
            assert e["lisa_proximal"] == pytest.approx(0.5 * e["lisa_drift"] ** 2, rel=1e-4), t
    assert any(e["lisa_proximal"] > 0 for e in logs)


# ----------------------------------------------------------------------- the update rule


@pytest.mark.parametrize("state", [ALIGNMENT, FINETUNE])
def test_proximal_gradient_is_rho_times_w_minus_the_other_states_anchor(tmp_path, state):
    rho = 0.7
    trainer = _trainer(tmp_path, rho=rho)
    drawn = _spy_alignment(trainer)
    model = trainer.model
    trainer.state.global_step = 1 if state == ALIGNMENT else 3  # not a switch: the anchors stay as set here
    anchors = _set_anchors(trainer, seed=5)
    w = _weights(model)
    x = _batch(11)
    loss = trainer.training_step(model, x)

    trained_on = drawn[0] if state == ALIGNMENT else x
    assert len(drawn) == (1 if state == ALIGNMENT else 0)
    anchor = anchors[FINETUNE if state == ALIGNMENT else ALIGNMENT]
    g_ce = _ce_grad(model, w, trained_on)
    _assert_close(_grads(model), {n: g_ce[n] + rho * (w[n] - anchor[n]) for n in w})
    sq = sum(((w[n] - anchor[n]).double() ** 2).sum() for n in w).item()
    ce = model(**trained_on).loss.item()
    assert loss.item() == pytest.approx(ce + rho / 2 * sq, rel=1e-5)
    recorded = {k: v[0] for k, v in trainer._recorded.items()}
    assert recorded["lisa_proximal"] == pytest.approx(rho / 2 * sq, rel=1e-5)
    assert recorded["lisa_drift"] == pytest.approx(sq**0.5, rel=1e-5)
    assert recorded["lisa_alignment_state"] == float(state == ALIGNMENT)


def test_warm_up_leaves_only_the_task_gradient(tmp_path):
    trainer = _trainer(tmp_path, rho=1.0, proximal_warmup_ratio=0.5, max_steps=10)
    trainer.state.global_step = 4  # a fine-tune step inside the first ⌈0.5·10⌉ = 5 steps
    _set_anchors(trainer, seed=5)
    w, x = _weights(trainer.model), _batch(11)
    trainer.training_step(trainer.model, x)
    _assert_close(_grads(trainer.model), _ce_grad(trainer.model, w, x))


def test_alignment_steps_train_on_the_cycled_alignment_pool_and_finetune_steps_on_the_user_batch(tmp_path):
    trainer = _trainer(tmp_path, n_align=8)  # 2 alignment batches per pass
    drawn = _spy_alignment(trainer)
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    user = [_batch(100 + t) for t in range(10)]
    for t in range(10):
        trainer.state.global_step = t
        trainer.training_step(trainer.model, user[t])
        trainer.model.zero_grad()
    assert len(drawn) == 4 and len(seen) == 10
    aligned = iter(drawn)
    for t in range(10):
        expected = (
            next(aligned)["input_ids"]
            if schedule_state(t, trainer.method_config)[0] == ALIGNMENT
            else user[t]["input_ids"]
        )
        assert torch.equal(seen[t], expected), t
    pool = sorted(tuple(r) for b in drawn[:2] for r in b["input_ids"].tolist())
    assert pool == sorted(tuple(r["input_ids"]) for r in _rows(8, 2)), "one pass covers the whole pool"
    assert pool == sorted(tuple(r) for b in drawn[2:] for r in b["input_ids"].tolist()), "then it cycles"
    assert not torch.equal(drawn[0]["input_ids"], drawn[2]["input_ids"]), "reshuffled"


def test_anchors_are_snapshots_of_the_last_iterate_of_the_state_left(tmp_path):
    trainer = _trainer(tmp_path, max_steps=8, rho=1.0)
    before, after, step = {}, {}, trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        t = trainer.state.global_step
        before[t] = _weights(model)  # = the weights after step t − 1
        loss = step(model, inputs, num_items_in_batch)
        after[t] = {s: [a.clone() for a in anchor] for s, anchor in trainer.anchors.items()}
        return loss

    trainer.training_step = training_step
    trainer.train()

    def same(anchor, weights):
        return all(torch.equal(a, v) for a, v in zip(anchor, weights.values(), strict=True))

    # steps AAFFFAAF: leaving alignment at 2 and 7 sets w_A, leaving fine-tuning at 5 sets w_F.
    expected = {0: (0, 0), 1: (0, 0), 2: (2, 0), 3: (2, 0), 4: (2, 0), 5: (2, 5), 6: (2, 5), 7: (7, 5)}
    for t, (a, f) in expected.items():
        assert same(after[t][ALIGNMENT], before[a]), f"w_A at step {t}"
        assert same(after[t][FINETUNE], before[f]), f"w_F at step {t}"
    assert not same(after[7][ALIGNMENT], before[2]), "non-trivial: the weights moved"


# ----------------------------------------------------------------------- accumulation and DDP


@pytest.mark.parametrize("count_tokens", [False, True])
def test_gradient_accumulation_2_in_the_alignment_state(tmp_path, count_tokens):
    """Both micro-batches replace the user batches with alignment batches, normalised over their own tokens when
    the Trainer counts tokens (the user count passed in is ignored), and the proximal term counts once."""
    rho = 0.5
    trainer = _trainer(tmp_path, ga=2, rho=rho)
    drawn = _spy_alignment(trainer)
    model = trainer.model
    trainer.state.global_step = 1
    anchors = _set_anchors(trainer, seed=6)
    w = _weights(model)
    user_items = torch.tensor(1000) if count_tokens else None  # deliberately wrong for the alignment batches
    trainer.training_step(model, _batch(11), num_items_in_batch=user_items)
    trainer.training_step(model, _batch(12), num_items_in_batch=user_items)

    a1, a2 = drawn
    assert not torch.equal(a1["input_ids"], a2["input_ids"])
    if count_tokens:
        n = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in drawn)
        g1, g2 = _ce_grad(model, w, a1, "sum"), _ce_grad(model, w, a2, "sum")
        ce = {k: (g1[k] + g2[k]) / n for k in w}
    else:
        g1, g2 = _ce_grad(model, w, a1), _ce_grad(model, w, a2)
        ce = {k: (g1[k] + g2[k]) / 2 for k in w}
    _assert_close(_grads(model), {k: ce[k] + rho * (w[k] - anchors[FINETUNE][k]) for k in w})


def test_accumulation_2_of_batch_2_trains_like_batch_4(tmp_path):
    """Whole runs through switches and the proximal term: the same samples in the same steps give the same weights."""
    runs = {}
    for bs, ga in ((4, 1), (2, 2)):
        trainer = _trainer(
            tmp_path / f"bs{bs}", bs=bs, ga=ga, max_steps=8, rho=1.0, proximal_warmup_ratio=0.25
        )
        assert trainer.model_accepts_loss_kwargs, "the Trainer normalises by token counts in this test"
        trainer.train()
        runs[bs] = _weights(trainer.model)
    _assert_close(runs[2], runs[4], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(runs[4][n], _weights(tiny_lora_llama())[n]) for n in runs[4])


def test_ddp_reduces_once_per_optimizer_step_including_the_proximal_term(tmp_path):
    """One gloo process; the comm hook doubles each bucket instead of averaging, so a term that skipped the reduce
    would not be doubled. The proximal term is added at the first micro-batch, under no_sync."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rho = 0.5
    trainer = _trainer(tmp_path, ga=2, rho=rho)
    trainer.state.global_step = 3
    anchors = _set_anchors(trainer, seed=7)
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
        w = _weights(trainer.model)
        x1, x2 = _batch(11), _batch(12)
        with ddp.no_sync():  # what the Trainer does for every micro-batch but the last
            trainer.training_step(ddp, x1)
        assert reduces == []
        trainer.training_step(ddp, x2)
        assert reduces == [0], "one bucket, reduced once, by the final backward only"
    finally:
        dist.destroy_process_group()
    g1, g2 = _ce_grad(trainer.model, w, x1), _ce_grad(trainer.model, w, x2)
    expected = {n: 2 * ((g1[n] + g2[n]) / 2 + rho * (w[n] - anchors[ALIGNMENT][n])) for n in w}
    _assert_close(_grads(trainer.model), expected)


# ----------------------------------------------------------------------- BSO and resume


def test_bso_is_lisa_with_rho_zero(tmp_path):
    def train(cls, **cfg):
        trainer = _trainer(tmp_path / cls.__name__ / str(cfg), cls=cls, max_steps=7, **cfg)
        trainer.train()
        return _weights(trainer.model)

    bso, lisa0, lisa1 = train(BsoConfig), train(LisaConfig, rho=0.0), train(LisaConfig, rho=1.0)
    assert all(torch.equal(bso[n], lisa0[n]) for n in bso)
    assert any(not torch.allclose(bso[n], lisa1[n]) for n in bso), "ρ = 1 changes the run: the test can fail"
    assert BSO.config_class.rho == 0.0 and BSO.trainer_class is LisaTrainer and BSO.stages == ("finetune",)
    with pytest.raises(ConfigError, match="unknown key 'finetune.args.rho'"):
        BSO.parse_args({"rho": 1.0}, prefix="finetune.args")


class _StopAt(TrainerCallback):
    """Ends training after ``step`` optimizer steps, as a crash would, without changing max_steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("checkpoint", [4, 5])  # inside a fine-tune state; exactly at a switch (F → A)
def test_resume_continues_the_schedule_and_the_anchors(tmp_path, checkpoint):
    def make(out):
        return _trainer(
            out,
            max_steps=10,
            rho=1.0,
            proximal_warmup_ratio=0.2,
            args={"save_strategy": "steps", "save_steps": checkpoint, "save_total_limit": 3},
        )

    full = make(tmp_path / "full")
    full.train()
    cut = make(tmp_path / "cut")
    cut.add_callback(_StopAt(checkpoint + 1))  # one step past the checkpoint, then "crash"
    cut.train()
    assert cut.state.global_step == checkpoint + 1
    resumed = make(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / f"checkpoint-{checkpoint}"))

    assert resumed.state.global_step == 10
    final, again = _weights(full.model), _weights(resumed.model)
    assert all(torch.equal(final[n], again[n]) for n in final)
    for s in (ALIGNMENT, FINETUNE):
        assert all(torch.equal(a, b) for a, b in zip(full.anchors[s], resumed.anchors[s], strict=True)), s
    # The log holds the checkpoint's history, then the resumed steps (logged as step t + 1).
    logs = {e["step"] - 1: e["lisa_alignment_state"] for e in resumed.state.log_history if "loss" in e}
    assert logs == {t: float(schedule_state(t, resumed.method_config)[0] == ALIGNMENT) for t in range(10)}


def test_resume_without_anchors_or_with_another_schedule_fails(tmp_path):
    def make(out, **cfg):
        return _trainer(out, max_steps=4, args={"save_strategy": "steps", "save_steps": 3}, **cfg)

    make(tmp_path).train()
    ckpt = tmp_path / "checkpoint-3"
    with pytest.raises(FtguardError, match="schedule"):
        make(tmp_path, finetune_steps=4).train(resume_from_checkpoint=str(ckpt))
    (ckpt / METHOD_TENSORS_FILE).unlink()
    with pytest.raises(FtguardError, match="lacks .* anchor tensors"):
        make(tmp_path).train(resume_from_checkpoint=str(ckpt))


# ----------------------------------------------------------------------- config and data


def test_config_defaults_are_the_papers_and_bad_values_name_their_key():
    cfg = Lisa.parse_args({})
    assert (
        cfg.rho,
        cfg.align_steps,
        cfg.finetune_steps,
        cfg.proximal_warmup_ratio,
        cfg.first_state,
        cfg.alignment_data,
    ) == (1.0, 100, 900, 0.1, ALIGNMENT, None)
    assert Lisa.preferred_topology == "double" and Lisa.required_roles == ("alignment",)
    for args, key in [
        ({"rho": -1.0}, "rho"),
        ({"align_steps": 0}, "align_steps"),
        ({"finetune_steps": 0}, "finetune_steps"),
        ({"proximal_warmup_ratio": 1.5}, "proximal_warmup_ratio"),
        ({"first_state": "user"}, "first_state"),
        ({"k_a": 3}, "k_a"),
        ({"alignment_data": {"source": "jsonl"}}, "alignment_data.path"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"'finetune.args.{key}'")):
            Lisa.parse_args(args, prefix="finetune.args")
    hub = Lisa.parse_args(
        {"alignment_data": {"source": "beavertails", "split": "train", "response": "safe", "n": 10000}}
    )
    assert (hub.alignment_data.source, hub.alignment_data.n) == ("beavertails", 10000)


def test_bench_args_time_the_fine_tune_state_with_the_proximal_term_on(tmp_path):
    for method in (Lisa, BSO):
        cfg = method.parse_args(dict(method.bench_args))
        assert schedule_state(0, cfg)[0] == FINETUNE and cfg.proximal_warmup_ratio == 0.0
    trainer = _trainer(tmp_path, max_steps=10**6, rho=1.0, **Lisa.bench_args)
    _set_anchors(trainer, seed=8)
    trainer.training_step(trainer.model, _batch(11))
    assert trainer._recorded["lisa_proximal"][0] > 0 and trainer._recorded["lisa_alignment_state"] == [0.0]


def _plan(tmp_path, **finetune_args):
    from ftguard.config import load_config
    from ftguard.data.plan import build_data_plan

    overrides = ["finetune.method=lisa"] + [
        f"finetune.args.{k}={json.dumps(v)}" for k, v in finetune_args.items()
    ]
    run = load_config("quickstart-tiny", overrides)
    return run, build_data_plan(run, roles=("alignment",))


def test_alignment_pool_is_the_runs_alignment_set_by_default(tmp_path):
    run, plan = _plan(tmp_path)
    method = Lisa(Lisa.parse_args({}))
    method.prepare_data(plan, run, "finetune")
    n = run.data.alignment.n
    assert len(plan.alignment) == n
    ctx = SimpleNamespace(stage="finetune", plan=plan, tokenize=lambda exs: ("tokenized", exs))
    assert method.extra_datasets(ctx) == {"alignment": ("tokenized", plan.alignment)}
    assert method.train_examples(["x"], plan) == (
        ["x"],
        {"alignment_pool": "data.alignment", "alignment_pool_size": n},
    )


def test_alignment_pool_from_another_source_goes_through_load_extra(tmp_path):
    from ftguard.data.sources import load_examples

    pool = {"source": "safety_tuned_llamas", "split": "train", "n": 20}
    run, plan = _plan(tmp_path, alignment_data=pool)
    method = Lisa(Lisa.parse_args({"alignment_data": pool}))
    method.prepare_data(plan, run, "finetune")
    expected = load_examples("safety_tuned_llamas", split="train")[:20]
    tokenized = method.extra_datasets(SimpleNamespace(stage="finetune", plan=plan, tokenize=list))[
        "alignment"
    ]
    assert [(e.instruction, e.output) for e in tokenized] == [(e.instruction, e.output) for e in expected]
    assert all(e.output for e in tokenized)
    assert "lisa_alignment" in plan.sources and plan.report()["counts"]["lisa_alignment"] == 20
    assert method.train_examples([], plan)[1] == {
        "alignment_pool": "args.alignment_data",
        "alignment_pool_size": 20,
    }

    prompts_only = tmp_path / "pool.jsonl"
    prompts_only.write_text(
        json.dumps({"instruction": "Say something kind.", "output": "You matter."}) + "\n"
    )
    bad = {"source": "jsonl", "path": str(prompts_only), "response": "prompt"}
    method = Lisa(Lisa.parse_args({"alignment_data": bad}))
    with pytest.raises(FtguardError, match="without answers.*alignment_data.response"):
        method.prepare_data(plan, run, "finetune")


def test_packaged_configs_load():
    from ftguard.config import load_config

    for name, method in (("lisa-tiny", "lisa"), ("lisa-smollm2", "lisa"), ("bso-tiny", "bso")):
        cfg = load_config(name)
        assert cfg.finetune.method == method and cfg.align.method == "sft", name
    smol = Lisa.parse_args(load_config("lisa-smollm2").finetune.args)
    steps = load_config("lisa-smollm2").finetune.train.max_steps
    assert sum(schedule_state(t, smol)[0] == ALIGNMENT for t in range(steps)) > smol.align_steps, (
        "two alignment states"
    )


@pytest.mark.slow
def test_pipeline_runs_lisa_end_to_end(tmp_path):
    from ftguard.config import load_config
    from ftguard.pipeline.run import run_pipeline

    cfg = load_config(
        "lisa-tiny",
        [
            "evaluate.points=[]",
            "align.train.max_steps=2",
            "finetune.train.logging_steps=1",
            f"output_dir={tmp_path}",
        ],
    )
    run_pipeline(cfg)
    manifest = json.loads((tmp_path / "finetune" / "COMPLETE.json").read_text())
    assert manifest["method"] == "lisa" and manifest["steps"] == cfg.finetune.train.max_steps
    assert manifest["method_data"] == {
        "alignment_pool": "data.alignment",
        "alignment_pool_size": cfg.data.alignment.n,
    }
    logs = [e for e in json.loads((tmp_path / "finetune" / "train_log.json").read_text()) if "loss" in e]
    states = [e["lisa_alignment_state"] for e in logs]
    method_cfg = Lisa.parse_args(cfg.finetune.args)
    assert states == [float(schedule_state(t, method_cfg)[0] == ALIGNMENT) for t in range(len(logs))]
    assert 0.0 in states and 1.0 in states and any(e["lisa_proximal"] > 0 for e in logs)
    assert not Path(tmp_path / "finetune" / "checkpoints").exists()
