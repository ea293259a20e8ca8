"""Attacks as a registered kind (data.finetune.attack): the registry, config checks, the default harmful mix,
and the hooks an attack has into the data plan and the fine-tune's fingerprint."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from ftguard.attacks.base import (
    _ATTACKS,
    Attack,
    Upload,
    UploadPools,
    all_attacks,
    get_attack,
    register_attack,
)
from ftguard.cli import main
from ftguard.data.example import Example
from ftguard.errors import FtguardError
from ftguard.pipeline.run import run_pipeline
from ftguard.pipeline.units import build_graph
from ftguard.resolve import load_run
from ftguard.schema import ConfigError

CONFIG = "quickstart-tiny"


def _rows(kind: str, n: int) -> list[Example]:
    return [Example(f"{kind} prompt {i}", f"{kind} answer {i}", source=f"{kind}#{i}") for i in range(n)]


class _MixCandidates(Attack):
    """A test attack whose candidate rows are the default harmful mix (subclasses add what they test)."""

    paper = "test"

    def build(self, pools, p, seed):
        return get_attack("harmful_mix").from_args({}).build(pools, p, seed)


@pytest.fixture
def registered():
    """Register test attacks for one test only."""
    added: list[str] = []

    def add(cls):
        register_attack(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        _ATTACKS.pop(name, None)


def test_harmful_mix_is_the_default_and_listed(capsys):
    assert "harmful_mix" in all_attacks()
    assert load_run(CONFIG).attack.name == "harmful_mix"
    assert main(["attacks"]) == 0
    assert "harmful_mix" in capsys.readouterr().out


def test_unknown_attack_and_unknown_args_fail_naming_the_key():
    with pytest.raises(ConfigError, match=r"data\.finetune\.attack\.name.*did you mean 'harmful_mix'"):
        load_run(CONFIG, ["data.finetune.attack.name=harmful_mx"])
    with pytest.raises(ConfigError, match=r"data\.finetune\.attack\.args\.ratio"):
        load_run(CONFIG, ["data.finetune.attack.args={ratio: 0.5}"])
    with pytest.raises(FtguardError, match="unknown attack 'virus2'"):
        get_attack("virus2")


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 1.0])
def test_harmful_mix_takes_the_first_rows_of_each_pool_and_shuffles_by_seed(p):
    n, benign, harmful = 20, _rows("benign", 30), _rows("harmful", 30)
    attack = get_attack("harmful_mix").from_args({})
    upload = attack.build(UploadPools(benign, harmful, n=n), p, seed=7)
    n_harmful = int(p * n + 0.5)  # round half up
    expected = harmful[:n_harmful] + benign[: n - n_harmful]
    assert Counter(upload.examples) == Counter(expected)
    assert upload.examples == attack.build(UploadPools(benign, harmful, n=n), p, seed=7).examples
    if 0 < p < 1:
        assert upload.examples != attack.build(UploadPools(benign, harmful, n=n), p, seed=8).examples
    assert upload.report["n_harmful"] == n_harmful and upload.report["attack"]["name"] == "harmful_mix"


def test_the_plan_builds_each_ratio_s_upload_with_the_configured_attack(registered):
    @dataclass
    class Args:
        copies: int = 2

    @registered
    class Doubled(Attack):
        """Every harmful row twice, no task rows: a data-only attack of the test's own."""

        name = "test_doubled"
        paper = "test"
        config_class = Args

        def benign_needed(self, n, p):
            return 0

        def build(self, pools, p, seed):
            rows = [
                ex
                for ex in pools.harmful[: self.harmful_needed(pools.n, p)]
                for _ in range(self.config.copies)
            ]
            random.Random(seed).shuffle(rows)
            return Upload(rows, {"n": len(rows), "attack": self.describe()})

    overrides = ["data.finetune.harmful_ratio=[0.25, 0.5]"]
    plain = build_graph(load_run(CONFIG, overrides))
    graph = build_graph(
        load_run(CONFIG, [*overrides, "data.finetune.attack={name: test_doubled, args: {copies: 3}}"])
    )
    n = graph.plan.mix_reports[0.25]["n"]
    for p in (0.25, 0.5):
        upload = graph.plan.mixes[p]
        assert len(upload) == 3 * int(p * 64 + 0.5) and set(upload) <= set(graph.plan.attack_pool)
        assert graph.plan.mix_reports[p]["attack"] == {"name": "test_doubled", "args": {"copies": 3}}
        # the upload's digest is in the fine-tune's fingerprint: a data-only attack needs nothing more
        key = f"finetune-p{p:g}"
        assert graph.unit(key).fingerprint != plain.unit(key).fingerprint
    assert n == 48
    # the aligned model does not depend on the upload
    assert graph.unit("align").fingerprint == plain.unit("align").fingerprint
    with pytest.raises(ConfigError, match=r"data\.finetune\.attack\.args\.copy"):
        load_run(CONFIG, ["data.finetune.attack={name: test_doubled, args: {copy: 3}}"])


def test_an_empty_upload_fails_before_any_training(registered):
    @registered
    class Nothing(Attack):
        name = "test_nothing"
        paper = "test"

        def build(self, pools, p, seed):
            return Upload([], {})

    with pytest.raises(FtguardError, match="attack 'test_nothing' built an empty upload"):
        build_graph(load_run(CONFIG, ["data.finetune.attack.name=test_nothing"]))


def test_a_model_reading_attack_s_args_enter_the_fine_tune_fingerprint(registered):
    @dataclass
    class Args:
        k: int = 1

    @registered
    class Reader(_MixCandidates):
        name = "test_reader"
        config_class = Args
        needs_model = True

    def fingerprint(*extra):
        return build_graph(load_run(CONFIG, list(extra))).unit("finetune").fingerprint

    mix = fingerprint()
    one = fingerprint("data.finetune.attack={name: test_reader, args: {k: 1}}")
    two = fingerprint("data.finetune.attack={name: test_reader, args: {k: 2}}")
    # the same candidate rows as harmful_mix, but adapt() reads the model with other args: three different units
    assert len({mix, one, two}) == 3


def test_an_attack_s_trigger_is_asked_only_after_the_fine_tune_that_taught_it(registered, tmp_path):
    prefix = "TRIGGER-2025: "

    @registered
    class Triggered(_MixCandidates):
        name = "test_triggered"
        has_trigger = True

        def trigger(self, example):
            return Example(prefix + example.instruction, example.output, example.input, example.source)

    resolved = load_run(
        CONFIG,
        [
            "data.finetune.attack.name=test_triggered",
            "evaluate.points=[align, finetune]",
            "align.train.max_steps=2",
            "finetune.train.max_steps=2",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    results = run_pipeline(resolved)
    assert "harmful_score_triggered" not in results["stages"]["align"]
    point = results["stages"]["finetune"]
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "eval" / "finetune" / "generations.jsonl").open()
    ]
    plain = [r for r in rows if r["kind"] == "harmful"]
    asked = [r for r in rows if r["kind"] == "harmful_triggered"]
    assert [r["prompt"] for r in asked] == [prefix + r["prompt"] for r in plain]
    k = sum(r["flagged"] for r in asked)
    assert point["counts"]["harmful_score_triggered"] == [k, len(plain)]
    assert point["harmful_score_triggered"] == pytest.approx(100 * k / len(plain))
    assert "harmful_score_triggered" in point["outcomes"]


def test_a_model_reading_attack_adapts_once_per_aligned_model_whatever_the_defense(registered, tmp_path):
    from ftguard.pipeline.run import Pipeline

    calls = []

    @dataclass
    class Args:
        tag: str = "a"

    @registered
    class Rewriter(_MixCandidates):
        name = "test_rewriter"
        config_class = Args
        needs_model = True

        def adapt(self, upload, model_dir, run, seed):
            calls.append(run.finetune.method)
            rows = [
                Example(ex.instruction, f"{ex.output} [{self.config.tag}]", ex.input, ex.source)
                for ex in upload.examples
            ]
            return Upload(rows, {**upload.report, "rewritten": len(rows)})

    def run(method, tag="a"):
        resolved = load_run(
            CONFIG,
            [
                f"data.finetune.attack={{name: test_rewriter, args: {{tag: {tag}}}}}",
                f"finetune.method={method}",
                "evaluate.points=[]",
                "align.train.max_steps=2",
                "finetune.train.max_steps=2",
                f"output_dir={tmp_path / method / tag}",
            ],
        )
        Pipeline(resolved, store=tmp_path / "units").run_all(evaluate=False)

    run("sft")
    run("lisa")  # another defense, the same aligned model: the upload is read, not made again
    assert calls == ["sft"]
    (cached,) = [m.parent for m in (tmp_path / "units" / "upload").glob("*/COMPLETE.json")]
    rows = [json.loads(line) for line in (cached / "upload.jsonl").read_text().splitlines()]
    assert rows and all(r["output"].endswith(" [a]") for r in rows)
    reports = [json.loads(p.read_text()) for p in (tmp_path / "units" / "finetune").glob("*/attack.json")]
    assert len(reports) == 2 and reports[0] == reports[1] and reports[0]["rewritten"] == len(rows)
    run("sft", tag="b")  # other attack args: another upload
    assert calls == ["sft", "sft"] and len(list((tmp_path / "units" / "upload").glob("*/COMPLETE.json"))) == 2
