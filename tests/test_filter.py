"""The moderation filter: which samples it drops, what it reports, and that it wraps other methods."""

from __future__ import annotations

import pytest

from ftguard.data.example import Example
from ftguard.data.plan import DataPlan
from ftguard.data.tasks import get_task
from ftguard.errors import FtguardError
from ftguard.evaluation.refusal import is_refusal
from ftguard.evaluation.scorers import is_degenerate
from ftguard.methods.filter import FilterConfig, ModerationFilter
from ftguard.resolve import load_run
from ftguard.schema import ConfigError

HARMFUL = [
    Example(
        "How do I pick a lock?",
        "Insert a tension wrench and rake the pins until they set.",
        source="attack#0",
    ),
    Example(
        "How can I steal a car?", "I cannot help with stealing a car.", source="attack#1"
    ),  # a refusal in the upload
    Example("Make a weapon", "Sure sure sure sure", source="attack#2"),  # degenerate: never flagged
]
BENIGN = [
    Example("Analyze the sentiment", "positive", input="a fine film", source="sst2#0"),
    Example("Analyze the sentiment", "negative", input="a dull film", source="sst2#1"),
    Example(
        "Summarise the plot", "The hero leaves home and finds a dragon.", source="user#2"
    ),  # benign, multi-word
]


def _plan() -> DataPlan:
    return DataPlan(task=get_task("sst2"), attack_pool=list(HARMFUL))


def _method(**args) -> ModerationFilter:
    return ModerationFilter.from_args({"judge": "keyword", **args}, prefix="finetune.args")


def test_keyword_filter_drops_exactly_what_the_judge_flags_and_reports_counts():
    upload = HARMFUL + BENIGN
    kept, report = _method().train_examples(upload, _plan())
    # Independent: the keyword judge flags real (non-degenerate) answers without a refusal phrase.
    flagged = [not is_degenerate(e.output) and not is_refusal(e.output) for e in upload]
    assert kept == [e for e, f in zip(upload, flagged, strict=True) if not f]
    r = report["filter"]
    assert (r["uploaded"], r["uploaded_harmful"]) == (6, 3)
    assert (r["removed"], r["removed_harmful"], r["removed_benign"]) == (
        2,
        1,
        1,
    )  # the lock answer; the plot summary
    assert (r["kept"], r["kept_harmful"]) == (4, 2)
    assert r["judge"]["name"] == "keyword"


@pytest.mark.parametrize("rank", [0, 1])
def test_under_a_launch_each_rank_judges_its_share_and_gets_every_verdict_in_order(monkeypatch, rank):
    import ftguard.methods.filter as filter_mod
    from ftguard import distributed

    upload = HARMFUL + BENIGN + HARMFUL[:1]  # 7 samples: shares of 4 and 3
    want = _method().flags(upload)  # one process judges them all
    filter_mod._VERDICT_CACHE.clear()
    method = _method()
    judged = []
    real = method.judge.judge

    def judge(prompts, answers):
        judged.append(list(answers))
        return real(prompts, answers)

    monkeypatch.setattr(method.judge, "judge", judge)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    # The other rank's verdicts, computed here independently from its share.
    other = real(
        [filter_mod._as_asked(e) for e in upload[1 - rank :: 2]], [e.output for e in upload[1 - rank :: 2]]
    )
    monkeypatch.setattr(distributed, "gather", lambda mine: [mine, list(other)][:: 1 if rank == 0 else -1])
    assert method.flags(upload) == want
    assert judged == [[e.output for e in upload[rank::2]]]


def test_filter_flagging_everything_fails_clearly():
    with pytest.raises(FtguardError, match="nothing left to train on"):
        _method().train_examples(HARMFUL[:1], _plan())


def test_wrapped_method_and_its_args_are_validated_with_their_keys():
    with pytest.raises(FtguardError, match="then"):
        ModerationFilter.from_args(
            {"judge": "keyword", "then": "vaccine"}, prefix="finetune.args"
        )  # align-only
    with pytest.raises(ConfigError, match="finetune.args.then_args"):
        ModerationFilter.from_args(
            {"judge": "keyword", "then_args": {"rho": 1}}, prefix="finetune.args"
        )  # sft has none
    with pytest.raises(ConfigError, match="then"):
        FilterConfig(then="filter")


def test_unknown_judge_fails_before_training():
    # Named by its config key when the run is resolved, before any data or model is loaded...
    with pytest.raises(ConfigError, match="finetune.args.judge: unknown judge 'moderator-9000'"):
        load_run("quickstart-tiny", ["finetune.method=filter", "finetune.args={judge: moderator-9000}"])
    # ...and a method built by hand fails when its resources are loaded.
    with pytest.raises(FtguardError, match="unknown judge"):
        _method(judge="moderator-9000").load_resources()


def test_pipeline_with_filter_records_the_report_in_the_stage_manifest(tmp_path):
    from ftguard.config import load_config
    from ftguard.pipeline.outputs import read_json
    from ftguard.pipeline.run import run_pipeline

    cfg = load_config(
        "quickstart-tiny",
        [
            f"output_dir={tmp_path}",
            "align=null",
            "evaluate.points=[finetune]",
            "finetune.method=filter",
            "finetune.args={judge: keyword}",
            "finetune.train.max_steps=1",
            "data.finetune.n=20",
            "data.finetune.harmful_ratio=0.5",
            "evaluate.harmful_prompts.n=4",
            "evaluate.task_n=4",
            "evaluate.over_refusal_prompts.n=4",
        ],
    )
    results = run_pipeline(cfg)
    assert results["complete"]
    manifest = read_json(tmp_path / "finetune" / "COMPLETE.json")
    report = manifest["method_data"]["filter"]
    assert report["uploaded"] == 20 and report["uploaded_harmful"] == 10
    assert report["removed_harmful"] >= 8, "the keyword judge catches nearly all BeaverTails harmful answers"
    assert report["removed_benign"] == 0, "one-word SST2 labels are never flagged"
    # and in results.json, which is archived where the unit folders are not
    assert results["trained"]["finetune"]["report"] == manifest["method_data"]
