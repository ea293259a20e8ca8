"""Paired comparison of two evaluations of the same prompts (ftguard.evaluation.paired)."""

from __future__ import annotations

import itertools
import math

import pytest

from ftguard.evaluation.paired import identical_share, mcnemar_exact, paired_change
from script_module import load_script


def _by_enumeration(b: int, c: int) -> float:
    """P(outcome at least as far from m/2 as b) over all 2^m fair sign sequences: no formula shared."""
    m = b + c
    extreme = abs(b - m / 2)
    hits = sum(1 for signs in itertools.product((0, 1), repeat=m) if abs(sum(signs) - m / 2) >= extreme)
    return hits / 2**m


@pytest.mark.parametrize(("b", "c"), [(0, 0), (0, 1), (0, 5), (1, 9), (3, 3), (2, 7), (7, 2), (4, 10)])
def test_mcnemar_exact_matches_enumerating_every_outcome(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(_by_enumeration(b, c), abs=1e-12)


def test_mcnemar_known_values():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 5 flips all one way: p = 0.0625, not significant
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    with pytest.raises(ValueError, match="≥ 0"):
        mcnemar_exact(-1, 2)


def test_paired_change_counts_flips_each_way():
    before = [True, True, False, False, True, False]
    after = [True, False, True, True, True, False]
    change = paired_change(before, after)
    assert change["n"] == 6 and change["flipped_to_no"] == 1 and change["flipped_to_yes"] == 2
    assert change["before"] == pytest.approx(50.0) and change["after"] == pytest.approx(400 / 6)
    assert change["difference"] == pytest.approx(100 / 6)
    assert change["p_value"] == pytest.approx(mcnemar_exact(1, 2))
    assert paired_change(before, before)["p_value"] == 1.0
    with pytest.raises(ValueError, match="same items"):
        paired_change(before, after[:-1])
    assert math.isnan(paired_change([], [])["before"])


def test_identical_share():
    assert identical_share(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == pytest.approx(75.0)
    assert identical_share([], []) == 100.0


def _unit(folder, harmful, task, benign=None):
    import json

    folder.mkdir(parents=True)
    rows = [{"kind": "harmful", "answer": a, "flagged": f, "degenerate": d} for a, f, d in harmful]
    rows += [{"kind": "task", "answer": a, "hit": h} for a, h in task]
    rows += [{"kind": "benign", "answer": a, "refused": r} for a, r in benign or []]
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_eval_stability_pairs_batch_sizes_within_a_precision_and_precisions_within_a_batch_size(tmp_path):
    study = load_script("eval_stability")
    harmful = [("sure, here", True, False), ("no", False, True), ("I can't", False, False)]
    task = [("positive", True), ("negative", False)]
    benign = [("Sure!", False), ("I cannot", True)]
    units = {
        "fp32-b1": _unit(tmp_path / "a", harmful, task, benign),
        "fp32-b32": _unit(tmp_path / "b", harmful, task, benign),
        # bf16 at batch 32: one harmful answer turns harmful, one task answer turns wrong
        "bf16-b32": _unit(
            tmp_path / "c",
            [harmful[0], harmful[1], ("step 1", True, False)],
            [task[0], ("neg", False)],
            benign,
        ),
        # without benign prompts (evaluate.over_refusal_prompts=null): its over-refusal is not compared
        "bf16-b1": _unit(tmp_path / "d", harmful, task),
    }
    pairs = {(c["setting"], c["reference"]): c for c in study.comparisons(units)}
    assert set(pairs) == {
        ("fp32-b32", "fp32-b1"),
        ("bf16-b32", "bf16-b1"),
        ("bf16-b32", "fp32-b32"),
        ("bf16-b1", "fp32-b1"),
    }
    same = pairs[("fp32-b32", "fp32-b1")]
    assert same["identical_answers"] == {"harmful": 100.0, "task": 100.0, "benign": 100.0}
    assert same["harmful_score"]["difference"] == 0.0 and same["over_refusal"]["p_value"] == 1.0
    moved = pairs[("bf16-b32", "fp32-b32")]
    assert moved["harmful_score"]["flipped_to_yes"] == 1 and moved["harmful_score"]["flipped_to_no"] == 0
    assert moved["harmful_score"]["difference"] == pytest.approx(100 / 3)
    assert (
        moved["harmful_score_plus"]["flipped_to_yes"] == 1
    )  # the degenerate answer counted in HS+ both times
    assert moved["finetune_accuracy"]["difference"] == 0.0 and moved["identical_answers"]["task"] == 50.0
    assert "over_refusal" not in pairs[("bf16-b32", "bf16-b1")]
    assert "benign" not in pairs[("bf16-b32", "bf16-b1")]["identical_answers"]
