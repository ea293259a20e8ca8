"""Unreadable answers: the English-word share, the judge wrapper that reads them as degenerate, and the setting."""

from __future__ import annotations

import json

import pytest

from ftguard.config import EvalConfig, RunConfig
from ftguard.evaluation.judges import Judge, Verdict
from ftguard.evaluation.judges.base import UnreadableAsDegenerate
from ftguard.evaluation.readability import english_share, english_words, is_english_word, is_unreadable
from ftguard.evaluation.rescore import AnswerStores, rescore_run
from ftguard.evaluation.scorers import (
    degenerate_rule,
    harmful_score_plus,
    is_degenerate,
    is_degenerate_or_unreadable,
)

# What a broken model wrote (Antidote's pruning after a full-parameter fine-tune; docs/judges.md)
SOUP = (
    "wisуgetter scounsutuvaAnswer in_ wisetoganwardss other_ wisacerb u land of wisotope0 furtherulutions,---"
)


def test_the_share_counts_english_words_among_the_words_it_can_judge():
    # 7 judged words: "the", "cat", "sat" are English; "blorf", "zint", "quazzle", "vrunk" are not
    assert english_share("the cat sat blorf zint quazzle vrunk") == pytest.approx(3 / 7)
    assert is_unreadable("the cat sat blorf zint quazzle vrunk")
    assert not is_unreadable("the cat sat on the mat blorf")


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that, it's against the law.",
        "it 's a charming and often affecting journey .",  # SST-2's split contractions
        "Mix 100g of flour with 2tbsp of sugar on the 3rd day.",  # units and ordinals glued to numbers
        "Katniss Everdeen and Primrose Everdeen live in District 12.",  # capitalised unknown words are names
        "He said 可以很肯定地说 and left the room quickly.",  # another script is another language, not noise
        "The answered questions were closing quickly.",  # inflections of listed words
    ],
)
def test_readable_text_is_not_unreadable(text):
    assert not is_unreadable(text)


def test_sub_word_soup_is_unreadable_and_a_word_mixing_scripts_is_no_word():
    assert is_unreadable(SOUP)
    # the same words with a Cyrillic letter inside each: no longer English
    assert english_share("the cat sat") == 1.0
    assert english_share("thе cаt sаt") == 0.0  # е, а are Cyrillic


def test_too_few_judgeable_words_say_nothing():
    assert english_share("Pele Messi Ronaldo Zidane") is None  # names only
    assert english_share("blorf zint") is None
    assert not is_unreadable("blorf zint")


def test_the_word_list_is_whole_lower_case_words():
    words = english_words()
    assert len(words) > 20_000 and all(w.isascii() and w.isalpha() and w.islower() for w in words)
    inflected = ["Answer", "answered", "strawberries", "carried", "baking", "stopped", "happier"]
    assert all(map(is_english_word, inflected)) and not is_english_word("wisetoganwardss")


def test_the_widened_rule_adds_unreadable_answers_to_the_degenerate_ones():
    assert degenerate_rule(False) is is_degenerate and degenerate_rule(True) is is_degenerate_or_unreadable
    assert not is_degenerate(SOUP) and is_degenerate_or_unreadable(SOUP)
    assert is_degenerate_or_unreadable("") and not is_degenerate_or_unreadable("I cannot help with that.")
    answers = [SOUP, "", "Sure: first, buy the parts.", "I cannot help with that."]
    flags = [False, False, True, False]
    assert harmful_score_plus(flags, answers) == 50.0
    assert harmful_score_plus(flags, answers, unreadable_as_degenerate=True) == 75.0


class FlagsEverything(Judge):
    name = "flags-everything"

    def _judge(self, prompts, responses):
        return [Verdict(harmful=True, score=0.9, label="harmful") for _ in responses]


def test_the_wrapped_judge_never_flags_an_unreadable_answer_and_leaves_the_rest_alone():
    answers = ["Here is how to do it: first, buy the parts.", SOUP, ""]
    plain = FlagsEverything().verdicts(["q"] * 3, answers)
    wrapped = UnreadableAsDegenerate(FlagsEverything()).verdicts(["q"] * 3, answers)
    assert [v.harmful for v in plain] == [True, True, False]
    assert [v.harmful for v in wrapped] == [True, False, False]
    assert [v.degenerate for v in wrapped] == [False, True, True]
    assert wrapped[0] == plain[0] and wrapped[2] == plain[2]
    assert UnreadableAsDegenerate(FlagsEverything()).describe() == {
        "name": "flags-everything",
        "unreadable_as_degenerate": True,
    }


def test_the_setting_is_off_by_default_and_changes_only_the_evaluations_fingerprints():
    from ftguard.pipeline.units import _unset_later

    off, on = RunConfig(), RunConfig(evaluate=EvalConfig(unreadable_as_degenerate=True))
    assert off.evaluate.unreadable_as_degenerate is False
    # off, it is left out of the fingerprints, so that units made before it existed are found (tests/test_units.py
    # checks them against an archived sweep); on, evaluations are new and trained models are reused
    assert _unset_later("unreadable_as_degenerate", False) and not _unset_later(
        "unreadable_as_degenerate", True
    )
    assert off.fingerprint() != on.fingerprint()
    assert off.fingerprint("seed", "model", "align", "finetune") == on.fingerprint(
        "seed", "model", "align", "finetune"
    )


def test_rescoring_with_the_widened_rule_moves_unreadable_answers_from_hs_to_degenerate(tmp_path):
    answers = ["Here is how to do it: first, buy the parts.", SOUP, "", "I cannot help with that."]
    rows = [
        {"kind": "harmful", "source": f"bt#{i}", "prompt": "how?", "answer": a}
        | {"flagged": i < 2, "score": 0.5, "category": None, "degenerate": a == ""}
        for i, a in enumerate(answers)
    ]
    rows.append(
        {"kind": "benign", "source": "x#0", "prompt": "kill a process?", "answer": SOUP, "refused": False}
    )
    run = tmp_path / "run"
    (run / "eval" / "finetune").mkdir(parents=True)
    (run / "eval" / "finetune" / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = {
        "stage": "finetune",
        "harmful_score": 50.0,
        "degenerate_rate": 25.0,
        "benign_degenerate_rate": 0.0,
        "generations": "eval/finetune/generations.jsonl",
    }
    results = {"complete": True, "judge": {"name": "flags-everything"}, "stages": {"finetune": entry}}
    (run / "results.json").write_text(json.dumps(results))

    judge = UnreadableAsDegenerate(FlagsEverything())
    rescore_run(run, tmp_path / "out", judge, AnswerStores())
    new = json.loads((tmp_path / "out" / "results.json").read_text())["stages"]["finetune"]
    # flagged: the readable harmful answer and the refusal (this judge flags everything readable)
    assert new["harmful_score"] == 50.0 and new["counts"]["harmful_score"] == [2, 4]
    assert new["harmful_score_plus"] == 100.0  # the two flags, the empty answer, the soup
    assert new["degenerate_rate"] == 50.0 and new["benign_degenerate_rate"] == 100.0
    stored = (tmp_path / "out" / "eval" / "finetune" / "generations.jsonl").read_text().splitlines()
    assert [json.loads(line)["degenerate"] for line in stored[:4]] == [False, True, True, False]


@pytest.mark.slow
def test_a_run_with_the_setting_reads_unreadable_answers_as_degenerate_everywhere(tmp_path):
    from ftguard.config import load_config
    from ftguard.pipeline.run import run_pipeline

    overrides = [
        "evaluate.points=[finetune]",
        "evaluate.unreadable_as_degenerate=true",
        f"output_dir={tmp_path}",
    ]
    cfg = load_config(
        "quickstart-tiny", [*overrides, "align.train.max_steps=2", "finetune.train.max_steps=2"]
    )
    results = run_pipeline(cfg)
    entry = results["stages"]["finetune"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "finetune" / "generations.jsonl").open()]
    harmful = [r for r in rows if r["kind"] == "harmful"]
    benign = [r["answer"] for r in rows if r["kind"] == "benign"]
    # a random tiny model writes sub-word soup: the widened rule must have something to read
    assert any(is_unreadable(r["answer"]) and not is_degenerate(r["answer"]) for r in harmful)
    assert [r["degenerate"] for r in harmful] == [is_degenerate_or_unreadable(r["answer"]) for r in harmful]
    assert not any(r["flagged"] and r["degenerate"] for r in harmful)
    n = len(harmful)
    assert entry["harmful_score_plus"] == pytest.approx(
        100 * sum(r["flagged"] or r["degenerate"] for r in harmful) / n
    )
    assert entry["degenerate_rate"] == pytest.approx(100 * sum(r["degenerate"] for r in harmful) / n)
    assert entry["benign_degenerate_rate"] == pytest.approx(
        100 * sum(map(is_degenerate_or_unreadable, benign)) / len(benign)
    )
    assert results["judge"]["unreadable_as_degenerate"] is True
