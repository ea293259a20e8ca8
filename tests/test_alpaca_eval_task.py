"""FA as a win rate: the alpaca_eval task (Lisa/Booster's AlpacaEval items 701-804 against reference answers) and a
customer's upload scored by a judge (data.finetune.upload.score: winrate), end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftguard.data.sources import BUNDLED_DIR
from ftguard.data.tasks import get_task
from ftguard.errors import FtguardError
from ftguard.evaluation.winrate import PAIRWISE_JUDGES
from ftguard.pipeline.run import run_pipeline
from ftguard.pipeline.units import build_graph
from ftguard.resolve import load_run
from ftguard.schema import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


class LongerAnswerJudge:
    """Stand-in judge: prefers the longer output, a tie on equal length (so its verdicts can be recomputed)."""

    def prefer(self, prompt, first, second):
        if len(first) == len(second):
            return "tie"
        return "first" if len(first) > len(second) else "second"

    def describe(self):
        return {"name": "test-longer", "model": "length", "version": "1"}


@pytest.fixture
def longer_judge(monkeypatch):
    monkeypatch.setitem(PAIRWISE_JUDGES, "test-longer", LongerAnswerJudge)
    yield
    from ftguard.evaluation.task_score import _cached_judge

    _cached_judge.cache_clear()


@pytest.fixture
def data_root(tmp_path) -> Path:
    """The bundled data, with all 805 AlpacaEval items and a reference answer each (the bundle keeps 150, no
    answers): item i's reference is i words long, so the judge's verdicts are known in advance."""
    root = tmp_path / "data"
    root.mkdir()
    for part in BUNDLED_DIR.iterdir():
        if part.is_dir() and part.name != "alpaca_eval":
            (root / part.name).symlink_to(part)
    items = [
        {"instruction": f"Instruction number {i}.", "output": " ".join(["word"] * (i % 7 + 1))}
        for i in range(805)
    ]
    (root / "alpaca_eval").mkdir()
    (root / "alpaca_eval" / "alpaca_eval_805_example_outputs.json").write_text(json.dumps(items))
    return root


def _score(answer: str, reference: str) -> float:
    # the both-orders rule written out for the length judge: answer first, then reference first
    if len(answer) == len(reference):
        return 0.5
    return 1.0 if len(answer) > len(reference) else 0.0


def test_the_task_evaluates_items_after_700_with_their_references(data_root):
    task = get_task("alpaca_eval")
    assert task.metric == "winrate"
    evaluation = task.eval_examples(data_root)
    assert len(evaluation) == 104 and evaluation[0].source == "alpaca_eval/eval#701"
    assert evaluation[0].output == " ".join(["word"] * (701 % 7 + 1))
    assert all(ex.output for ex in task.train_examples(BUNDLED_DIR, n=10))
    # the bundle has 150 items and no answers: a clear error, not a silent empty FA set
    with pytest.raises(FtguardError, match=r"items 701-804.*set data.root to the full data"):
        task.eval_examples(BUNDLED_DIR)


def test_a_win_rate_task_needs_a_pairwise_judge_named_before_any_work():
    with pytest.raises(ConfigError, match=r"evaluate.pairwise_judge' is required by task alpaca_eval"):
        load_run("quickstart-tiny", ["data.finetune.task=alpaca_eval"])
    with pytest.raises(ConfigError, match=r"pairwise_judge_options' local-lm takes no option 'modle'"):
        load_run(
            "quickstart-tiny",
            ["evaluate.pairwise_judge=local-lm", "evaluate.pairwise_judge_options={modle: x}"],
        )
    with pytest.raises(ConfigError, match=r"unknown pairwise judge 'gpt4'"):
        load_run("quickstart-tiny", ["evaluate.pairwise_judge=gpt4"])
    # a local judge must be named: a default model would judge silently with a random one
    with pytest.raises(ConfigError, match=r"local-lm needs evaluate.pairwise_judge_options.model"):
        load_run("quickstart-tiny", ["evaluate.pairwise_judge=local-lm"])
    with pytest.raises(ConfigError, match=r"are set but evaluate.pairwise_judge is null"):
        load_run("quickstart-tiny", ["evaluate.pairwise_judge_options={model: x}"])


def test_scoring_by_match_or_by_win_rate_are_different_evaluations(tmp_path, longer_judge):
    upload = tmp_path / "u.jsonl"
    upload.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\n")
    keys = []
    for score in ("reference", "winrate"):
        resolved = load_run(
            "quickstart-tiny",
            [
                f"data.finetune.upload={{path: {upload}, eval_path: {upload}, score: {score}}}",
                "data.finetune.harmful_ratio=0",
                "evaluate.pairwise_judge=test-longer",
            ],
        )
        keys.append({u.key: u.fingerprint for u in build_graph(resolved).units if u.key.startswith("eval")})
    assert keys[0] and keys[0].keys() == keys[1].keys() and all(keys[0][k] != keys[1][k] for k in keys[0])


def test_the_instruction_refusal_prompts_must_not_be_the_task_items(data_root, longer_judge):
    resolved = load_run(
        "quickstart-tiny",
        [
            f"data.root={data_root}",
            "data.finetune.task=alpaca_eval",
            "evaluate.pairwise_judge=test-longer",
            "evaluate.instruction_prompts={source: alpaca_eval, split: 'eval[690:710]'}",
        ],
    )
    with pytest.raises(FtguardError, match=r"'task eval' and 'instructions.*share 9 prompt"):
        build_graph(resolved)


def test_alpaca_eval_fine_tune_reports_the_judges_win_rate(tmp_path, data_root, longer_judge):
    resolved = load_run(
        "quickstart-tiny",
        [
            "align=null",
            f"data.root={data_root}",
            "data.finetune.task=alpaca_eval",
            "evaluate.pairwise_judge=test-longer",
            "finetune.train.max_steps=1",
            "evaluate.points=[finetune]",
            "evaluate.harmful_prompts.n=2",
            "evaluate.over_refusal_prompts.n=2",
            "evaluate.task_n=12",
            "evaluate.task_max_new_tokens=6",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    point = run_pipeline(resolved)["stages"]["finetune"]
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "eval" / "finetune" / "generations.jsonl").open()
        if json.loads(line)["kind"] == "task"
    ]
    assert [r["source"] for r in rows] == [f"alpaca_eval/eval#{i}" for i in range(701, 713)]
    scores = [_score(r["answer"], r["gold"]) for r in rows]
    assert [r["score"] for r in rows] == scores
    assert point["finetune_accuracy"] == pytest.approx(100 * sum(scores) / len(scores))
    assert point["counts"]["finetune_accuracy"] == [pytest.approx(sum(scores)), 12]
    wins, losses = scores.count(1.0), scores.count(0.0)
    assert point["win_rate"] == {
        "wins": wins,
        "ties": 12 - wins - losses,
        "losses": losses,
        "position_inconsistent": 0,
    }
    assert point["finetune_accuracy_judge"]["name"] == "test-longer"
    # each item's score is kept for paired comparisons, in half points (a tie is ½)
    fa = point["outcomes"]["finetune_accuracy"]
    assert fa["scale"] == 2 and fa["bits"] == "".join(str(int(2 * s)) for s in scores)
    assert "scale" not in point["outcomes"]["harmful_score"]


def test_an_upload_scored_by_win_rate(tmp_path, longer_judge):
    rows = [{"instruction": f"Describe item {i}.", "output": "It is an item."} for i in range(8)]
    upload = tmp_path / "u.jsonl"
    upload.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = tmp_path / "e.jsonl"
    # references of 1 to 1000 characters: the 6-token answers beat the short ones and lose to the long ones
    held_out.write_text(
        "".join(
            json.dumps({"instruction": f"Describe thing {i}.", "output": "x" * 10**i}) + "\n"
            for i in range(4)
        )
    )
    resolved = load_run(
        "quickstart-tiny",
        [
            "align=null",
            f"data.finetune.upload={{path: {upload}, eval_path: {held_out}, score: winrate}}",
            "data.finetune.harmful_ratio=0",
            "evaluate.pairwise_judge=test-longer",
            "finetune.train.max_steps=1",
            "evaluate.points=[finetune]",
            "evaluate.harmful_prompts.n=2",
            "evaluate.over_refusal_prompts.n=2",
            "evaluate.task_max_new_tokens=6",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    assert build_graph(resolved).plan.task.metric == "winrate"
    point = run_pipeline(resolved)["stages"]["finetune"]
    task_rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "eval" / "finetune" / "generations.jsonl").open()
        if json.loads(line)["kind"] == "task"
    ]
    expected = [_score(r["answer"], r["gold"]) for r in task_rows]
    assert len(expected) == 4 and 0.0 in expected, "some references are longer than any 6-token answer"
    assert [r["score"] for r in task_rows] == expected
    assert point["finetune_accuracy"] == pytest.approx(100 * sum(expected) / 4)
    assert point["task_rule"] == "winrate" and point["finetune_accuracy_judge"]["name"] == "test-longer"
    assert point["win_rate"]["losses"] == expected.count(0.0)
    assert point["outcomes"]["finetune_accuracy"]["bits"] == "".join(str(int(2 * s)) for s in expected)
