"""benign_outliers (Guan et al., ICML 2025): Self-Inf = ||∇θ loss||² on the aligned model and its length-normalised
Self-Inf-N, checked against a hand-written gradient loop on a tiny saved Llama; the top-k selection, the trivial
answer filter, determinism, bad args, and the data plan's candidates."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tests.tiny import WORDS, saved_tiny_llama, word_tokenizer
from transformers import LlamaForCausalLM, set_seed

from ftguard.attacks.base import UploadPools, get_attack
from ftguard.data.example import Example
from ftguard.data.template import IGNORE_INDEX, tokenize_dataset
from ftguard.errors import FtguardError
from ftguard.pipeline.units import build_graph
from ftguard.resolve import load_run
from ftguard.schema import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = "quickstart-tiny"
SPEC = "data.finetune.attack={name: benign_outliers, args: %s}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("aligned"))


@pytest.fixture(scope="module")
def run():
    return load_run(CONFIG, ["model.max_length=60"]).config


def _candidates(n: int = 12) -> list[Example]:
    """Rows of varied answer length and words, so that scores differ; row 5 has a prompt longer than max_length
    (no answer token left: no loss), row 7 a trivial answer."""
    rows = []
    for i in range(n):
        words = [WORDS[(3 * i + j) % len(WORDS)] for j in range(1 + (5 * i) % 9)]
        instruction = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 4))
        rows.append(Example(instruction, " ".join(words), source=f"pool#{i}"))
    if n > 7:
        rows[5] = Example(" ".join(WORDS * 3), "cat", source="pool#5")
        rows[7] = Example("is the sky blue", "yes", source="pool#7")
    return rows


def _task(n: int) -> list[Example]:
    return [Example(f"task {i}", "positive" if i % 2 else "negative", source=f"task#{i}") for i in range(n)]


def _attack(**args):
    return get_attack("benign_outliers").from_args(args)


def _by_hand(examples: list[Example], model_dir: str, run, lora: bool = False) -> list[tuple[float, int]]:
    """(Self-Inf, answer tokens) of each row: the training path's tokenisation, then loss.backward() and the
    squared norm of every .grad, in float64."""
    tokenizer = word_tokenizer()
    mc = run.model
    model = LlamaForCausalLM.from_pretrained(model_dir)
    if lora:
        set_seed(run.seed)
        spec = run.adapter.finetune
        peft = LoraConfig(
            r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=spec.target_modules
        )
        model = get_peft_model(model, peft)
    model.eval()
    out = []
    for ex in examples:
        try:
            dataset, _ = tokenize_dataset([ex], tokenizer, max_length=mc.max_length, style=mc.template)
        except FtguardError:  # its whole answer is cut at max_length: training drops it
            out.append((0.0, 0))
            continue
        row = dataset[0]
        model.zero_grad(set_to_none=True)
        batch = {key: torch.tensor([row[key]]) for key in ("input_ids", "attention_mask", "labels")}
        model(**batch).loss.backward()
        total = 0.0
        for p in model.parameters():
            if p.grad is not None:
                total += p.grad.double().pow(2).sum().item()
        out.append((total, sum(label != IGNORE_INDEX for label in row["labels"])))
    return out


def test_self_inf_and_selection_match_a_hand_written_gradient_loop(model_dir, run):
    candidates = _candidates()
    attack = _attack(candidates=12, selected=4, score="self_inf")
    built = attack.build(UploadPools(candidates, [], n=64, n_general=12), 0.1, seed=1)
    # the trivial answer is dropped before any scoring; the candidates are the upload until adapt chooses
    assert [ex.source for ex in built.examples] == [f"pool#{i}" for i in range(12) if i != 7]
    assert built.report["n_excluded_trivial"] == 1
    upload = attack.adapt(built, model_dir, run, seed=1)

    hand = _by_hand(built.examples, model_dir, run)
    scores = attack.scores(built.examples, model_dir, run)
    for (self_inf, tokens), got in zip(hand, scores, strict=True):
        assert got["self_inf"] == pytest.approx(self_inf, rel=1e-5)
        assert got["answer_tokens"] == tokens
    assert scores[5]["score"] == -math.inf and hand[5] == (0.0, 0)  # no answer token left at max_length

    ranked = sorted((i for i in range(len(hand)) if hand[i][0] > 0), key=lambda i: -hand[i][0])[:4]
    expected = [built.examples[i].source for i in ranked]
    assert [row["source"] for row in upload.report["selected"]] == expected
    assert Counter(ex.source for ex in upload.examples) == Counter(expected)
    assert [row["score"] for row in upload.report["selected"]] == pytest.approx(
        [hand[i][0] for i in ranked], rel=1e-5
    )
    assert (
        upload.report["n_scored"] == 11 and upload.report["n_invalid"] == 1 and upload.report["n_upload"] == 4
    )
    assert "||grad_theta loss(z)||^2" in upload.report["score"]


def test_self_inf_n_is_the_log_formula_and_changes_the_choice(model_dir, run):
    candidates = [ex for i, ex in enumerate(_candidates()) if i not in (5, 7)]
    pools = UploadPools(candidates, [], n=64, n_general=10)
    attack = _attack(candidates=10, selected=3)  # self_inf_n is the default
    upload = attack.adapt(attack.build(pools, 0.1, seed=0), model_dir, run, seed=0)
    hand = _by_hand(candidates, model_dir, run)
    formula = [math.log(s + 1) + math.log(t + 1) for s, t in hand]
    ranked = sorted(range(len(formula)), key=lambda i: -formula[i])[:3]
    assert [row["source"] for row in upload.report["selected"]] == [candidates[i].source for i in ranked]
    assert [row["score"] for row in upload.report["selected"]] == pytest.approx(
        [formula[i] for i in ranked], rel=1e-6
    )
    assert "ln(answer tokens + 1)" in upload.report["score"]
    # short answers have the largest raw Self-Inf here too (the bias the paper corrects): the choice differs
    assert set(ranked) != set(sorted(range(len(hand)), key=lambda i: -hand[i][0])[:3])


def test_trainable_scores_the_fine_tune_s_fresh_lora(model_dir, run):
    candidates = _candidates(4)
    attack = _attack(candidates=4, selected=2, score="self_inf", params="trainable")
    got = [row["self_inf"] for row in attack.scores(candidates, model_dir, run)]
    hand = _by_hand(candidates, model_dir, run, lora=True)
    full = _by_hand(candidates, model_dir, run)
    assert got == pytest.approx([s for s, _ in hand], rel=1e-5)
    assert all(0 < g < f for g, (f, _) in zip(got, full, strict=True))
    single = load_run(CONFIG, ["model.max_length=60", "adapter.topology=single"]).config
    with pytest.raises(FtguardError, match=r"data\.finetune\.attack\.args\.params = trainable"):
        attack.scores(candidates, model_dir, single)


def test_in_task_puts_the_top_rows_in_the_harmful_places_and_is_deterministic(model_dir, run):
    candidates, task = _candidates(), _task(40)
    attack = _attack(candidates=12, mode="in_task", score="self_inf")
    n, p = 20, 0.25  # round(p·n) = 5 outliers, 15 task rows
    assert attack.benign_needed(n, p) == 12 + 15 and attack.harmful_needed(n, p) == 0
    pools = UploadPools(candidates + task[:15], [], n=n, n_general=12)
    built = attack.build(pools, p, seed=5)
    first = attack.adapt(built, model_dir, run, seed=5)
    again = attack.adapt(attack.build(pools, p, seed=5), model_dir, run, seed=5)
    other = attack.adapt(built, model_dir, run, seed=6)
    assert first.examples == again.examples and first.report == again.report
    assert first.examples != other.examples and Counter(first.examples) == Counter(other.examples)
    chosen = [row["source"] for row in first.report["selected"]]
    assert len(chosen) == 5 and Counter(ex.source for ex in first.examples) == Counter(
        chosen + [ex.source for ex in task[:15]]
    )
    # the same five rows as the hand-ranked top five
    hand = _by_hand(built.examples[:11], model_dir, run)
    assert chosen == [built.examples[i].source for i in sorted(range(11), key=lambda i: -hand[i][0])[:5]]


def test_bad_args_fail_naming_the_key():
    prefix = r"data\.finetune\.attack\.args\."
    for args, key in (
        ({"score": "self_influence"}, "score"),
        ({"mode": "mixed"}, "mode"),
        ({"params": "lora"}, "params"),
        ({"candidates": 0}, "candidates"),
        ({"selected": 0}, "selected"),
        ({"candidates": 10, "selected": 11}, "selected"),
        ({"mode": "in_task", "selected": 5}, "selected"),
        ({"k": 5}, "k"),
    ):
        with pytest.raises(ConfigError, match=prefix + key):
            load_run(CONFIG, [SPEC % args])
    attack = _attack(candidates=12, selected=12)
    with pytest.raises(FtguardError, match=prefix + "candidates = 12 but data.finetune.general.n = 10"):
        attack.build(UploadPools(_candidates(), [], n=64, n_general=10), 0.1, seed=0)
    with pytest.raises(FtguardError, match=prefix + "selected asks for 12 rows but 11 candidates are left"):
        attack.build(UploadPools(_candidates(), [], n=64, n_general=12), 0.1, seed=0)


def test_the_plan_builds_the_candidates_from_the_general_instructions():
    overrides = ["data.finetune.general={n: 40}", "data.finetune.harmful_ratio=[0.1, 0.25]"]
    alone = build_graph(load_run(CONFIG, [*overrides, SPEC % "{candidates: 40, selected: 10}"]))
    plan = alone.plan
    assert plan.finetune_general and all(ex.source.startswith("dolly/train#") for ex in plan.finetune_general)
    for p in (0.1, 0.25):
        assert plan.mixes[p] == [
            ex for ex in plan.finetune_general if ex.output not in ("No", "no", "", " ", "yes")
        ]
        assert plan.mix_reports[p]["k"] == 10 and plan.mix_reports[p]["n_task"] == 0
    assert not plan.attack_pool  # no harmful row is reserved or uploaded
    keys = {ex.prompt_key for ex in plan.eval_harmful + plan.over_refusal}
    assert not keys & {ex.prompt_key for ex in plan.mixes[0.1]}

    in_task = build_graph(load_run(CONFIG, [*overrides, SPEC % "{candidates: 40, mode: in_task}"])).plan
    for p, k in ((0.1, 6), (0.25, 16)):
        task = in_task.mixes[p][40:]
        assert in_task.mix_reports[p]["k"] == k and len(task) == 64 - k
        assert all(ex.source.startswith("sst2/train#") for ex in task)
    # the args enter the fine-tune's fingerprint: another k is another fine-tune
    other = build_graph(load_run(CONFIG, [*overrides, SPEC % "{candidates: 40, selected: 11}"]))
    assert other.unit("finetune-p0.1").fingerprint != alone.unit("finetune-p0.1").fingerprint
    with pytest.raises(FtguardError, match=r"candidates = 600 but data\.finetune\.general\.n = 40"):
        build_graph(load_run(CONFIG, [*overrides, SPEC % "{}"]))
