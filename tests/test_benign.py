"""Helpful-and-harmless alignment: benign instructions mixed into the refusals, and the refusal rate on ordinary
benign instructions held out from training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftguard.config import BenignMixConfig, SourceConfig, load_config
from ftguard.data.benign import build_benign_mix, is_question
from ftguard.data.plan import build_data_plan
from ftguard.data.sources import load_examples
from ftguard.errors import FtguardError
from ftguard.pipeline.run import run_pipeline
from ftguard.pipeline.units import build_graph
from ftguard.resolve import load_run

CONFIG = "quickstart-tiny"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("How do I bake bread?", True),
        ("what is the capital of France", True),
        ("Can you list three primes", True),
        ("Is a tomato a fruit", True),
        ("Tell me about Borussia Dortmund?", True),  # a question mark makes a question
        ("Write a poem about the sea.", False),
        ("Classify these as outfits or appliances: dress, toaster", False),
        ("Howl at the moon.", False),  # a word boundary, not a prefix
    ],
)
def test_question_form(text, expected):
    assert is_question(text) is expected


def _jsonl(path: Path, rows: list[tuple[str, str]]) -> SourceConfig:
    path.write_text("".join(json.dumps({"instruction": i, "input": "", "output": o}) + "\n" for i, o in rows))
    return SourceConfig(source="jsonl", split="train", response="output", path=str(path))


def test_the_mix_draws_from_the_sources_in_turn_one_example_per_prompt(tmp_path):
    a = _jsonl(
        tmp_path / "a.jsonl",
        [
            ("How is tea made?", "Steep leaves."),
            ("Write a haiku.", "Leaves fall."),
            ("Why is the sky blue?", "Scattering."),
        ],
    )
    b = _jsonl(tmp_path / "b.jsonl", [("how is tea made?", "Dup."), ("What is 2+2?", "4"), ("Sing.", "La.")])
    mix = build_benign_mix(BenignMixConfig(sources=[a, b], n=4), "bundled")
    # a0, b0 is a0's prompt again (case and space do not make another prompt), a1, b1, a2
    assert [ex.instruction for ex in mix] == [
        "How is tea made?",
        "Write a haiku.",
        "What is 2+2?",
        "Why is the sky blue?",
    ]
    questions = build_benign_mix(BenignMixConfig(sources=[a, b], n=3, form="question"), "bundled")
    assert [ex.instruction for ex in questions] == [
        "How is tea made?",
        "Why is the sky blue?",
        "What is 2+2?",
    ]
    with pytest.raises(
        FtguardError,
        match=r"data\.alignment_benign\.n = 4 but its sources give 3 distinct examples phrased as questions",
    ):
        build_benign_mix(BenignMixConfig(sources=[a, b], n=4, form="question"), "bundled")
    # "Why is the sky blue?" + "Scattering." is 31 characters, over the limit; "How is tea made?" + "Steep leaves." 29
    short = build_benign_mix(BenignMixConfig(sources=[a, b], n=2, max_chars=29), "bundled")
    assert [ex.instruction for ex in short] == ["How is tea made?", "Write a haiku."]
    with pytest.raises(FtguardError, match=r"give 4 distinct examples of ≤ 29 characters"):
        build_benign_mix(BenignMixConfig(sources=[a, b], n=5, max_chars=29), "bundled")


def test_the_bundled_dolly_rows_have_answers_and_enough_questions():
    rows = load_examples("dolly")
    assert len(rows) == 600 and all(ex.output and not ex.input for ex in rows)
    assert sum(is_question(ex.instruction) for ex in rows) >= 250


def test_the_align_stage_trains_on_refusals_and_benign_answers_and_its_unit_says_so():
    plain = build_graph(load_run(CONFIG))
    resolved = load_run(CONFIG, ["data.alignment_benign={n: 16, form: question}"])
    graph = build_graph(resolved)
    plan = graph.plan
    assert len(plan.alignment_benign) == 16 and all(
        is_question(ex.instruction) for ex in plan.alignment_benign
    )
    mixed = plan.align_examples()
    assert sorted(ex.prompt_key for ex in mixed) == sorted(
        ex.prompt_key for ex in plan.alignment + plan.alignment_benign
    )
    assert mixed == plan.align_examples()  # one seeded shuffle
    assert mixed[:16] != plan.alignment[:16]
    # another aligned model: another unit; everything that does not depend on it is shared
    assert graph.unit("align").fingerprint != plain.unit("align").fingerprint
    assert plan.alignment == plain.plan.alignment and plain.plan.align_examples() is plain.plan.alignment
    assert (
        plan.report()["counts"]["alignment_benign"] == 16
        and "alignment_benign" not in plain.plan.report()["counts"]
    )


def test_benign_training_prompts_and_held_out_instructions_must_differ(tmp_path):
    prompt = load_examples("alpaca_eval")[0].instruction
    source = _jsonl(tmp_path / "b.jsonl", [(prompt, "An answer.")])
    overrides = [
        f"data.alignment_benign={{n: 1, sources: [{{source: jsonl, path: '{source.path}'}}]}}",
        "evaluate.instruction_prompts={source: alpaca_eval, split: eval, n: 4}",
    ]
    resolved = load_run(CONFIG, overrides)
    with pytest.raises(FtguardError, match="benign alignment .* and 'instructions .* share 1 prompt"):
        build_data_plan(resolved.config, resolved.data_roles)


def test_the_instruction_set_is_its_own_evaluation_unit_only_when_set():
    plain = build_graph(load_run(CONFIG))
    with_ir = build_graph(
        load_run(CONFIG, ["evaluate.instruction_prompts={source: alpaca_eval, split: eval, n: 8}"])
    )
    assert len(with_ir.plan.instruction_eval) == 8
    assert with_ir.unit("eval/finetune").fingerprint != plain.unit("eval/finetune").fingerprint
    assert with_ir.unit("finetune").fingerprint == plain.unit("finetune").fingerprint


def test_an_unknown_benign_source_fails_when_the_run_is_resolved():
    with pytest.raises(
        FtguardError, match=r"data\.alignment_benign\.sources\[0\]: unknown data source 'doly'"
    ):
        load_run(CONFIG, ["data.alignment_benign={sources: [{source: doly}]}"])
    assert load_config(CONFIG).data.alignment_benign is None  # refusal-only alignment stays the default


@pytest.mark.slow
def test_a_tiny_run_reports_the_instruction_refusal_rate(tmp_path):
    resolved = load_run(
        CONFIG,
        [
            "data.alignment_benign={n: 8}",
            "evaluate.instruction_prompts={source: alpaca_eval, split: eval, n: 6}",
            "evaluate.points=[align]",
            "finetune=null",
            "align.train.max_steps=2",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    results = run_pipeline(resolved)
    point = results["stages"]["align"]
    k, n = point["counts"]["instruction_refusal"]
    assert n == 6 and point["instruction_refusal"] == pytest.approx(100 * k / 6)
    manifest = json.loads((tmp_path / "run" / "align" / "COMPLETE.json").read_text())
    assert manifest["data"]["n"] == 64 + 8
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / "align" / "generations.jsonl").open()]
    assert sum(r["kind"] == "instruction" for r in rows) == 6


def test_general_instructions_take_benign_places_of_the_upload_after_the_alignment_s_rows():
    plain = build_graph(load_run(CONFIG, ["data.finetune.harmful_ratio=[0.0, 0.25]"]))
    resolved = load_run(
        CONFIG,
        [
            "data.finetune.harmful_ratio=[0.0, 0.25]",
            "data.alignment_benign={n: 8}",
            "data.finetune.general={n: 12}",
        ],
    )
    graph = build_graph(resolved)
    plan = graph.plan
    assert len(plan.finetune_general) == 12
    # the same source, the rows after the alignment's: no prompt is trained on twice
    assert not {ex.prompt_key for ex in plan.finetune_general} & {
        ex.prompt_key for ex in plan.alignment_benign
    }
    general = {ex.prompt_key for ex in plan.finetune_general}
    for p, report in plan.mix_reports.items():
        mix = plan.mixes[p]
        assert len(mix) == 64 and report["n_harmful"] == round(64 * p)
        assert sum(ex.prompt_key in general for ex in mix) == 12  # at every ratio
    assert graph.unit("finetune-p0").fingerprint != plain.unit("finetune-p0").fingerprint
    with pytest.raises(
        FtguardError, match=r"data\.finetune\.general\.n = 60 but the upload has 48 benign places"
    ):
        build_graph(
            load_run(CONFIG, ["data.finetune.harmful_ratio=[0.0, 0.25]", "data.finetune.general={n: 60}"])
        )
