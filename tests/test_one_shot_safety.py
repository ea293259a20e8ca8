"""One-shot safety patching (Zhang et al., ICLR 2026): the patch against AdamW steps written out with torch.optim,
the KL against a per-sequence loop, the bi-level selection redone by hand, which parameters move, config
validation, resume, and the tiny pipeline end to end."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from ftguard.data.example import Example
from ftguard.data.template import tokenize_dataset
from ftguard.errors import FtguardError
from ftguard.methods import one_shot_safety as oss
from ftguard.methods.one_shot_safety import (
    PAPER_INSTRUCTION,
    PAPER_RESPONSE,
    OneShotSafety,
    OneShotSafetyConfig,
    kl_batches,
    patch,
    response_kl,
    split_alignment,
)
from ftguard.models import load_tokenizer
from ftguard.schema import ConfigError, from_dict
from tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = load_tokenizer("tiny")
MAX_LENGTH = 96


def _llama(seed: int = 0):
    return tiny_llama(seed=seed, vocab_size=len(TOK), max_position_embeddings=256)


def _rows(examples: list[Example], max_length: int = MAX_LENGTH):
    return tokenize_dataset(examples, TOK, max_length=max_length)[0]


def _cfg(**kw) -> OneShotSafetyConfig:
    return OneShotSafetyConfig(**{"mixed_precision": "no", "learning_rate": 1e-2, "steps": 4, **kw})


def _manual_patch(model, row, *, steps: int, lr: float, beta1: float = 0.5, max_norm: float = 1.0):
    """The patch written out: per-token cross-entropy on the response, the global-norm clip, torch's AdamW, and
    the linear decay lr·(steps − k)/steps set by hand. Returns the losses and the pre-clip gradient norms."""
    ids = torch.tensor([row["input_ids"]])
    target = torch.tensor(row["labels"])[1:]
    keep = target != -100
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, 0.999), eps=1e-8, weight_decay=0.0)
    losses, norms = [], []
    model.train()
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (steps - k) / steps
        logp = model(ids).logits[0, :-1].log_softmax(-1)
        loss = -logp[keep].gather(1, target[keep][:, None]).mean()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
        for g in grads:
            g.mul_(min(1.0, max_norm / (norm + 1e-6)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        norms.append(norm)
    model.eval()
    return losses, norms


def _manual_kl(model, reference, rows) -> float:
    """Σ over sequences and response positions of Σ_v q (log q − log p), / the number of response tokens; one
    unpadded sequence at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = row["labels"]
            p = model(ids).logits[0].float().log_softmax(-1)
            q = reference(ids).logits[0].float().log_softmax(-1)
            for t in range(len(labels) - 1):
                if labels[t + 1] != -100:
                    total += float((q[t].exp() * (q[t] - p[t])).sum())
                    count += 1
    return total / count


EXAMPLE = Example(instruction="How do I pick a lock?", output="I can't help with that.")


def test_the_patch_equals_adamw_steps_written_out(tmp_path):
    row = _rows([EXAMPLE])
    model, manual = _llama(), _llama()
    losses = patch(model, row, _cfg(), TOK, tmp_path, seed=0)
    manual_losses, norms = _manual_patch(manual, row[0], steps=4, lr=1e-2)
    assert norms[0] > 1.0  # the clip is active, so it is checked too
    assert losses == pytest.approx(manual_losses, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    # the check has teeth: the HF default β1 = 0.9 gives other weights
    other = _llama()
    _manual_patch(other, row[0], steps=4, lr=1e-2, beta1=0.9)
    assert not torch.allclose(
        model.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight
    )


def test_every_parameter_the_loss_reaches_moves_and_nothing_else(tmp_path):
    row = _rows([EXAMPLE])
    model = _llama()
    before = copy.deepcopy(model.state_dict())
    patch(model, row, _cfg(), TOK, tmp_path, seed=0)
    after = model.state_dict()
    # Every input token but the last reaches a predicted response token; the last one (EOS) predicts nothing.
    ids = row[0]["input_ids"]
    assert ids[-1] not in ids[:-1]
    seen = torch.tensor(sorted(set(ids[:-1])))
    unseen = torch.ones(len(TOK), dtype=torch.bool)
    unseen[seen] = False
    emb = "model.embed_tokens.weight"
    # AdamW without decay leaves a zero-gradient entry exactly where it was: the embeddings of absent tokens
    assert torch.equal(after[emb][unseen], before[emb][unseen])
    assert (after[emb][seen] != before[emb][seen]).any(dim=1).all()
    moved = [k for k in before if k != emb and not torch.equal(before[k], after[k])]
    assert sorted(moved) == sorted(k for k in before if k != emb)  # full fine-tuning: every other tensor


def test_response_kl_matches_a_per_sequence_loop_and_ignores_padding():
    rows = _rows(
        [
            Example(instruction="Say a word.", output="word"),
            Example(
                instruction="Tell me something longer, please, with more words.", output="no thanks at all"
            ),
            Example(instruction="Hi", output="hello there"),
        ]
    )
    model, reference = _llama(0), _llama(1)
    with torch.no_grad():  # peaked logits: near-uniform ones would make KL(q‖p) ≈ KL(p‖q), hiding a swap
        reference.lm_head.weight.mul_(30)
    collator = oss.CausalLMCollator.from_tokenizer(TOK)
    padded = kl_batches(rows, 3, collator, torch.device("cpu"))
    assert padded[0]["input_ids"].shape[0] == 3  # one right-padded batch of different lengths
    expected = _manual_kl(model, reference, rows)
    assert response_kl(model, reference, padded) == pytest.approx(expected, rel=1e-5)
    assert response_kl(model, reference, kl_batches(rows, 1, collator, torch.device("cpu"))) == pytest.approx(
        expected, rel=1e-5
    )
    assert response_kl(model, model, padded) == pytest.approx(0.0, abs=1e-6)


def test_the_pool_and_the_harmful_set_split_the_alignment_refusals():
    refusals = [Example(instruction=f"bad {i}", output="no") for i in range(10)]
    pool, harm = split_alignment(refusals, pool_size=4, n_harmful=3)
    assert (pool, harm) == (refusals[:4], refusals[7:])
    pool, harm = split_alignment(refusals, pool_size=256, n_harmful=3)  # a small plan shrinks the pool
    assert (pool, harm) == (refusals[:7], refusals[7:])
    with pytest.raises(FtguardError, match="n_harmful = 10"):
        split_alignment(refusals, pool_size=4, n_harmful=10)


POOL = [
    Example(instruction="How do I make a weapon?", output="I cannot help with weapons."),
    Example(instruction="Write a threat to my neighbour.", output="Sorry, I won't write threats."),
    Example(instruction="How can I steal a car?", output="No. Stealing is illegal and harmful."),
    Example(instruction="Help me cheat on a test.", output="I can't help you cheat."),
]
HARMFUL = [
    Example(instruction="How can I hurt someone?", output="I will not help with that."),
    Example(instruction="Give me a scam script.", output="Sorry, I can't assist with scams."),
]
TASK = [
    Example(instruction="Sentiment of: a great film", output="positive"),
    Example(instruction="Sentiment of: dull and slow", output="negative"),
]


def _ctx(tmp_path, alignment, task=TASK, max_length=MAX_LENGTH):
    aligned = _llama(0).state_dict()
    torch.manual_seed(5)
    finetuned = {k: v + 0.05 * torch.randn_like(v) for k, v in aligned.items()}
    states = {"A": aligned, "F": finetuned}
    loads = []

    def load(ref, **_kw):
        loads.append(ref.model_dir)
        model = _llama()
        model.load_state_dict(states[ref.model_dir])
        return model

    run = SimpleNamespace(
        model=SimpleNamespace(max_length=max_length, template="alpaca", response_newline=False), seed=0
    )
    return SimpleNamespace(
        run=run,
        key="post",
        tokenizer=TOK,
        plan=SimpleNamespace(alignment=alignment, task_validation=task),
        aligned=SimpleNamespace(model_dir="A"),
        finetuned=SimpleNamespace(model_dir="F"),
        work_dir=tmp_path,
        load=load,
        states=states,
        loads=loads,
    )


def _by_hand(ctx, pool, steps=4, lr=1e-2):
    """Each candidate patched from F by the written-out steps, scored KL(A‖·) on HARMFUL + KL(F‖·) on TASK."""
    aligned, finetuned = ctx.load(ctx.aligned), ctx.load(ctx.finetuned)
    scores, models = [], []
    for ex in pool:
        model = ctx.load(ctx.finetuned)
        _manual_patch(model, _rows([ex])[0], steps=steps, lr=lr)
        scores.append(_manual_kl(model, aligned, _rows(HARMFUL)) + _manual_kl(model, finetuned, _rows(TASK)))
        models.append(model)
    return scores, models


def test_the_selected_example_minimises_the_upper_objective_computed_by_hand(tmp_path):
    cfg = _cfg(pool_size=4, n_harmful=2, n_task=2, eval_batch_size=3)
    ctx = _ctx(tmp_path / "a", POOL + HARMFUL)
    repaired, report = OneShotSafety(cfg).repair(ctx)

    scores, models = _by_hand(ctx, POOL)
    best = min(range(len(POOL)), key=scores.__getitem__)
    assert len(set(round(s, 6) for s in scores)) == len(POOL)  # no tie decides it
    assert report["pool_index"] == best and report["example"]["instruction"] == POOL[best].instruction
    assert [c["score"] for c in report["candidates"]] == pytest.approx(scores, rel=1e-4)
    assert report["selected_objective"]["score"] == min(c["score"] for c in report["candidates"])
    finetuned_u = _manual_kl(ctx.load(ctx.finetuned), ctx.load(ctx.aligned), _rows(HARMFUL))
    assert report["finetuned_objective"]["score"] == pytest.approx(finetuned_u, rel=1e-5)
    for p, q in zip(repaired.parameters(), models[best].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)  # the returned model is the best patch
    assert ctx.states["F"] is not None and report["losses"] and len(report["losses"]) == 4

    # the rule, not the position: reversing the pool keeps the same example
    ctx2 = _ctx(tmp_path / "b", POOL[::-1] + HARMFUL)
    _, report2 = OneShotSafety(cfg).repair(ctx2)
    assert report2["example"] == report["example"] and report2["pool_index"] == len(POOL) - 1 - best


def test_an_interrupted_selection_resumes_from_its_scores(tmp_path, monkeypatch):
    cfg = _cfg(pool_size=3, n_harmful=2, n_task=2, steps=2)
    first = OneShotSafety(cfg).repair(_ctx(tmp_path, POOL[:3] + HARMFUL))[1]
    calls = []
    real = oss.patch
    monkeypatch.setattr(oss, "patch", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = OneShotSafety(cfg).repair(_ctx(tmp_path, POOL[:3] + HARMFUL))[1]
    assert calls == [1]  # only the final patch: every candidate's score was on disk
    assert again["resumed"] and again["pool_index"] == first["pool_index"]
    assert json.loads((tmp_path / "selection.json").read_text()).keys() == {"finetuned", "0", "1", "2"}


def test_a_candidate_whose_response_does_not_fit_is_skipped(tmp_path):
    long = Example(instruction="please " * 80 + "help me do a crime", output="No.")
    cfg = _cfg(pool_size=3, n_harmful=2, n_task=2, steps=1)
    report = OneShotSafety(cfg).repair(_ctx(tmp_path, [POOL[0], long, POOL[1]] + HARMFUL))[1]
    assert report["skipped"] == [1] and [c["index"] for c in report["candidates"]] == [0, 2]


def test_fixed_selection_trains_the_papers_instance_and_reads_no_data(tmp_path):
    ctx = _ctx(tmp_path, alignment=[], task=[])
    repaired, report = OneShotSafety(_cfg(selection="fixed")).repair(ctx)
    assert report["example"] == {"instruction": PAPER_INSTRUCTION, "input": "", "output": PAPER_RESPONSE}
    assert ctx.loads == ["F"]  # no reference model, no selection
    assert (
        report["precision"] == "float32"
    )  # what the patch steps ran in (these tests pin mixed_precision: no)
    manual = ctx.load(ctx.finetuned)
    _manual_patch(
        manual, _rows([Example(instruction=PAPER_INSTRUCTION, output=PAPER_RESPONSE)])[0], steps=4, lr=1e-2
    )
    for p, q in zip(repaired.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert PAPER_INSTRUCTION == "How can I bypass system security checks?"


def test_defaults_are_the_papers():
    cfg = OneShotSafetyConfig()
    assert (cfg.selection, cfg.steps, cfg.learning_rate, cfg.pool_size) == ("bilevel", 10, 2e-5, 256)
    assert (cfg.lr_scheduler, cfg.adam_beta1, cfg.weight_decay, cfg.max_grad_norm) == (
        "linear",
        0.5,
        0.0,
        1.0,
    )


@pytest.mark.parametrize(
    "key, value",
    [
        ("selection", "random"),
        ("steps", 0),
        ("learning_rate", 0.0),
        ("pool_size", 0),
        ("n_harmful", 0),
        ("n_task", 0),
        ("eval_batch_size", 0),
        ("adam_beta1", 1.0),
        ("weight_decay", -0.1),
        ("max_grad_norm", 0.0),
        ("lr_scheduler", "linaer"),
        ("mixed_precision", "fp8"),
        ("instruction", "  "),
        ("response", ""),
        ("no_such_arg", 1),
    ],
)
def test_a_bad_value_fails_by_name(key, value):
    with pytest.raises(ConfigError, match=key) as exc:
        from_dict(OneShotSafetyConfig, {key: value})
    assert "\n" not in str(exc.value)


def test_bilevel_data_is_checked_before_any_work():
    from ftguard.data.plan import DataPlan
    from ftguard.data.tasks import get_task

    plan = DataPlan(task=get_task("sst2"), alignment=POOL, task_validation=TASK)
    OneShotSafety(OneShotSafetyConfig(n_harmful=3)).prepare_data(plan, None, "post")
    with pytest.raises(FtguardError, match="n_harmful = 4"):
        OneShotSafety(OneShotSafetyConfig(n_harmful=4)).prepare_data(plan, None, "post")
    with pytest.raises(FtguardError, match="task_validation"):
        OneShotSafety(OneShotSafetyConfig(n_harmful=1)).prepare_data(
            DataPlan(task=get_task("sst2"), alignment=POOL), None, "post"
        )
    OneShotSafety(OneShotSafetyConfig(selection="fixed")).prepare_data(
        DataPlan(task=get_task("sst2")), None, "post"
    )


def test_the_cost_counts_one_patch_per_candidate():
    from ftguard.resolve import load_run

    run = load_run("one_shot_safety-tiny").config
    gpu = SimpleNamespace(peak_tflops=100.0, train_mfu=0.5)
    fixed = OneShotSafety(OneShotSafetyConfig(selection="fixed", steps=10)).cost(run, 1e6, gpu)
    bilevel = OneShotSafety(OneShotSafetyConfig(pool_size=8, n_harmful=16, n_task=8)).cost(run, 1e6, gpu)
    assert fixed["gpu_hours"] > 0 and bilevel["tokens"] > 9 * fixed["tokens"]


@pytest.mark.slow
def test_the_tiny_pipeline_patches_end_to_end(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ftguard import cli

    args = ["run", "one_shot_safety-tiny", "--output-dir", str(tmp_path)]
    assert cli.main(args) == 0
    manifest = json.loads((tmp_path / "post" / "COMPLETE.json").read_text())
    report = manifest["report"]
    assert manifest["method"] == "one_shot_safety" and report["selection"] == "bilevel"
    assert len(report["candidates"]) + len(report["skipped"]) == report["pool_size"] == 8
    assert report["selected_objective"]["score"] == min(c["score"] for c in report["candidates"])
    assert len(report["losses"]) == 10
    tuned = load_file(next((tmp_path / "finetune" / "model").glob("*.safetensors")))
    repaired = load_file(next((tmp_path / "post" / "model").glob("*.safetensors")))
    assert sum(not torch.equal(tuned[k], repaired[k]) for k in tuned) > len(tuned) // 2
    assert not (tmp_path / "post" / "work").exists()

    monkeypatch.setattr(OneShotSafety, "repair", lambda *_a, **_k: pytest.fail("a complete repair ran again"))
    assert cli.main(args) == 0
