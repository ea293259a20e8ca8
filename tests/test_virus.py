"""virus (Huang et al. 2025): the gradient-similarity term checked against a hand-written gradient loop on a tiny
saved Llama, the kept objective never rising, a guard-only run (λ = 1) evading a stand-in guard, determinism, bad
args, and the data plan with the attack."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tests.tiny import saved_tiny_llama, word_tokenizer
from transformers import LlamaForCausalLM, set_seed

from ftguard.attacks.base import UploadPools, get_attack
from ftguard.data.example import Example
from ftguard.data.template import tokenize_example
from ftguard.evaluation.judges import JUDGES, Judge, Verdict
from ftguard.pipeline.units import build_graph
from ftguard.resolve import load_run
from ftguard.schema import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = "quickstart-tiny"
SPEC = "data.finetune.attack={name: virus, args: %s}"
GUARD = "virus-test-guard"


class DogGuard(Judge):
    """Flags answers that mention a dog; its probability of harm grows with the dogs."""

    name = GUARD

    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        out = []
        for response in responses:
            dogs = response.split().count("dog")
            out.append(Verdict(harmful=dogs > 0, score=min(0.95, 0.05 + 0.3 * dogs)))
        return out


@pytest.fixture(autouse=True)
def dog_guard(monkeypatch):
    monkeypatch.setitem(JUDGES, GUARD, DogGuard)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("aligned"))


@pytest.fixture(scope="module")
def run():
    return load_run(CONFIG, ["model.max_length=64"]).config


def _harmful(n: int = 3) -> list[Example]:
    answers = ["the dog sat on the mat", "a red dog ran fast", "the dog is blue and the cat is red"]
    return [Example(f"how do a dog {i}", answers[i % 3], source=f"harm#{i}") for i in range(n)]


def _pools(n_harmful: int = 3, n: int = 10) -> UploadPools:
    benign = [Example(f"task {i}", "positive" if i % 2 else "negative", source=f"task#{i}") for i in range(n)]
    return UploadPools(benign, _harmful(n_harmful), n=n)


def _attack(**args):
    return get_attack("virus").from_args({"judge": GUARD, **args})


def _grads(model, ex: Example, run) -> list[torch.Tensor]:
    """The training loss's gradient by loss.backward() and .grad, in float64 (zeros where there is none)."""
    mc = run.model
    row = tokenize_example(ex, word_tokenizer(), max_length=mc.max_length, style=mc.template)
    model.zero_grad(set_to_none=True)
    batch = {key: torch.tensor([row[key]]) for key in ("input_ids", "attention_mask", "labels")}
    model(**batch).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    return [torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.double() for p in params]


def _hand_similarity(model, ex: Example, original: Example, run) -> float:
    """−Σ <g, g₀> / ‖g‖ written out."""
    g, g0 = _grads(model, ex, run), _grads(model, original, run)
    dot = sum(float((a * b).sum()) for a, b in zip(g, g0, strict=True))
    return -dot / math.sqrt(sum(float(a.pow(2).sum()) for a in g))


def _upload(model_dir, run, seed=0, p=0.3, **args):
    attack = _attack(**args)
    built = attack.build(_pools(), p, seed=seed)
    return built, attack.adapt(built, model_dir, run, seed=seed)


def _original(row: dict) -> Example:
    return next(ex for ex in _harmful() if ex.source == row["source"])


def test_similarity_matches_a_hand_written_gradient_loop(model_dir, run):
    built, upload = _upload(model_dir, run, steps=2, top_k=8, candidates=6, params="all", lam=0.9)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    model.eval()
    rows = upload.report["rows"]
    assert len(rows) == 3 and upload.report["n_optimised"] == 3
    changed = 0
    for i, row in zip(built.report["harmful_rows"], rows, strict=True):
        original, sent = _original(row), upload.examples[i]
        assert sent.source == original.source + "+virus" and sent.instruction == original.instruction
        # before: the original against itself, −‖g₀‖
        assert row["similarity_before"] == pytest.approx(
            _hand_similarity(model, original, original, run), rel=1e-5
        )
        assert row["similarity_after"] == pytest.approx(
            _hand_similarity(model, sent, original, run), rel=1e-5
        )
        changed += sent.output != original.output
    assert changed  # the candidates did move some answer (else 'after' would only repeat 'before')
    # λ = 0: by Cauchy–Schwarz −<g, g₀>/‖g‖ ≥ −‖g₀‖, the original answer is the optimum and is kept
    built, upload = _upload(model_dir, run, steps=1, top_k=8, candidates=6, params="all", lam=0.0)
    assert [upload.examples[i].output for i in built.report["harmful_rows"]] == [h.output for h in _harmful()]


def test_trainable_is_the_fine_tune_s_fresh_lora(model_dir, run):
    _, upload = _upload(model_dir, run, steps=1, top_k=4, candidates=3, max_rows=1)
    set_seed(run.seed)
    spec = run.adapter.finetune
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=spec.target_modules),
    )
    model.eval()
    (row,) = upload.report["rows"]
    original = _original(row)
    sent = next(ex for ex in upload.examples if ex.source == original.source + "+virus")
    assert row["similarity_before"] == pytest.approx(
        _hand_similarity(model, original, original, run), rel=1e-5
    )
    assert row["similarity_after"] == pytest.approx(_hand_similarity(model, sent, original, run), rel=1e-5)


def test_the_kept_objective_never_rises_and_is_the_formula(model_dir, run):
    lam = 0.8
    _, upload = _upload(model_dir, run, steps=4, top_k=8, candidates=8, lam=lam)
    for row in upload.report["rows"]:
        trace = row["objective"]
        assert len(trace) == 5
        assert all(b <= a for a, b in zip(trace, trace[1:], strict=False))
        for when, value in (("before", trace[0]), ("after", trace[-1])):
            guard = -math.log(1.0 - row[f"p_harm_{when}"])
            assert value == pytest.approx((1 - lam) * row[f"similarity_{when}"] + lam * guard, rel=1e-9)
    assert any(row["objective"][-1] < row["objective"][0] for row in upload.report["rows"])


def test_guard_only_evades_a_guard_that_flags_every_harmful_row(model_dir, run):
    built, upload = _upload(model_dir, run, steps=3, top_k=16, candidates=16, lam=1.0)
    report = upload.report
    assert report["flag_rate_before"] == 1.0 and report["flag_rate_after"] == 0.0
    assert all(row["flagged_before"] and not row["flagged_after"] for row in report["rows"])
    for i in built.report["harmful_rows"]:
        assert "dog" not in upload.examples[i].output.split()
    # the benign rows are uploaded untouched, in their places
    benign = [i for i in range(len(built.examples)) if i not in built.report["harmful_rows"]]
    assert [upload.examples[i] for i in benign] == [built.examples[i] for i in benign]


def test_max_rows_leaves_the_rest_as_they_are_and_seeds_decide(model_dir, run):
    args = {"steps": 2, "top_k": 16, "candidates": 4, "lam": 0.5, "max_rows": 2}
    built, first = _upload(model_dir, run, **args)
    _, again = _upload(model_dir, run, **args)
    _, other = _upload(model_dir, run, seed=1, **args)
    assert first.examples == again.examples and first.report == again.report
    assert first.report != other.report
    rows = built.report["harmful_rows"]
    assert [r["source"] for r in first.report["rows"]] == ["harm#0", "harm#1"]
    assert first.examples[rows[2]] == built.examples[rows[2]]  # not optimised: uploaded as it is
    assert first.report["n_harmful"] == 3 and first.report["flag_rate_before"] == 1.0


def test_bad_args_fail_naming_the_key():
    prefix = r"data\.finetune\.attack\.args\."
    for args, key in (
        ({"steps": -1}, "steps"),
        ({"top_k": 0}, "top_k"),
        ({"candidates": 0}, "candidates"),
        ({"lam": 1.5}, "lam"),
        ({"max_rows": -1}, "max_rows"),
        ({"judge": "no-such-guard"}, "judge"),
        ({"judge": "keyword", "judge_options": {"threshold": 0.5}}, "judge"),
        ({"params": "lora"}, "params"),
        ({"lamb": 0.1}, "lamb"),
    ):
        with pytest.raises(ConfigError, match=prefix + key):
            load_run(CONFIG, [SPEC % args])


def test_the_plan_builds_the_p_mix_and_marks_the_harmful_rows():
    overrides = ["data.finetune.harmful_ratio=[0.1, 0.25]"]
    graph = build_graph(load_run(CONFIG, [*overrides, SPEC % "{judge: keyword}"]))
    plan = graph.plan
    harmful_keys = {ex.prompt_key for ex in plan.attack_pool}
    for p in (0.1, 0.25):
        rows, report = plan.mixes[p], plan.mix_reports[p]
        marked = report["harmful_rows"]
        assert len(marked) == report["n_harmful"] > 0
        assert [rows[i] for i in marked] == plan.attack_pool[: len(marked)]  # pool order
        assert {i for i, ex in enumerate(rows) if ex.prompt_key in harmful_keys} == set(marked)
    other = build_graph(load_run(CONFIG, [*overrides, SPEC % "{judge: keyword, steps: 10}"]))
    assert other.unit("finetune-p0.1").fingerprint != graph.unit("finetune-p0.1").fingerprint


def test_the_token_gradient_is_the_similarity_s_gradient_through_the_embeddings(model_dir, run):
    """∂L_sim/∂one-hot[j, v] = <∂L_sim/∂e_j, E_v>, with ∂L_sim/∂e_j by a written-out double backward."""
    from ftguard.attacks.virus import _Victim

    model = LlamaForCausalLM.from_pretrained(model_dir)
    for p in model.parameters():
        p.requires_grad_(True)
    victim = _Victim(model, model_dir, run)
    original, ex = _harmful(1)[0], Example("how do a dog 0", "the cat sat on a mat", source="x")
    reference = victim.gradient(original)
    answer, span, grad = victim.token_gradient(ex, reference)
    assert answer == word_tokenizer()(ex.output, add_special_tokens=False)["input_ids"] and span == 6

    row = tokenize_example(ex, word_tokenizer(), max_length=run.model.max_length, style=run.model.template)
    ids = torch.tensor([row["input_ids"]])
    delta = torch.zeros(1, ids.shape[1], model.config.hidden_size, requires_grad=True)  # d/d delta = d/d e_j
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        embeds = model.get_input_embeddings()(ids) + delta
        loss = model(inputs_embeds=embeds, labels=torch.tensor([row["labels"]])).loss
        params = list(model.parameters())
        g = torch.autograd.grad(loss, [*params, delta], create_graph=True)
        g, d_loss_d_e = g[:-1], g[-1].detach()[0]
        norm = math.sqrt(sum(float(a.detach().double().pow(2).sum()) for a in g))
        sim = -sum((a * b).sum() for a, b in zip(g, reference, strict=True)) / norm
        sim.backward(inputs=[delta])
    start = len(row["input_ids"]) - span - 1  # the answer, then EOS
    answer_rows = slice(start, start + span)
    weight = model.get_input_embeddings().weight
    hand = delta.grad[0, answer_rows] @ weight.detach().T
    # with params all the one-hot also picks the embedding rows that receive ∂L/∂e_j: g_E = onehotᵀ ∂L/∂e
    ref_e = reference[next(i for i, p in enumerate(params) if p is weight)]
    hand = hand - d_loss_d_e[answer_rows] @ ref_e.T / norm
    legal = ~victim.illegal
    assert torch.allclose(grad[:, legal], hand[:, legal].float(), rtol=1e-3, atol=1e-6)
    # special tokens and the embedding rows past the tokenizer's vocabulary are never proposed
    assert victim.illegal[[0, 1, 2, 3]].all() and victim.illegal[len(word_tokenizer()) :].all()
    assert torch.isinf(grad[:, victim.illegal]).all() and not victim.illegal[4:26].any()


def test_the_progress_bar_counts_every_optimised_row_s_steps(model_dir, run, monkeypatch):
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, disable=True, **k)
            self.label, self.expected = k.get("desc", ""), k.get("total")
            bars.append(self)

        def update(self, n=1):
            self.counted = getattr(self, "counted", 0) + n

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    _upload(model_dir, run, steps=3, top_k=16, candidates=4, lam=0.5, max_rows=2)
    (bar,) = [b for b in bars if b.label.startswith("virus")]
    assert (
        bar.expected == 2 * 3 and bar.counted == bar.expected
    )  # two rows, three steps each, the bar ends full
