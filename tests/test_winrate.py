import io
import json
import logging
import urllib.request

import pytest

from ftguard.errors import FtguardError
from ftguard.evaluation import winrate
from ftguard.evaluation.stats import wilson_interval
from ftguard.evaluation.winrate import (
    PAIRWISE_JUDGES,
    LocalLMJudge,
    OpenAICompatibleJudge,
    PairwiseJudge,
    pair_score,
    register_pairwise_judge,
    win_rate,
)


class ScriptedJudge:
    """Answers from a fixed list, in call order."""

    def __init__(self, script):
        self.script, self.calls = list(script), []

    def prefer(self, prompt, first, second):
        self.calls.append((prompt, first, second))
        return self.script.pop(0)

    def describe(self):
        return {"name": "scripted", "model": None, "version": None}


@pytest.fixture(scope="module")
def longer_judge():
    # The stand-in judge: prefers the longer output, ties on equal length. Registered for these tests only.
    @register_pairwise_judge("test-longer")
    class LongerJudge:
        def prefer(self, prompt, first, second):
            return "tie" if len(first) == len(second) else ("first" if len(first) > len(second) else "second")

        def describe(self):
            return {"name": "test-longer", "model": None, "version": "1"}

    yield winrate.get_pairwise_judge("test-longer")
    del PAIRWISE_JUDGES["test-longer"]


def test_both_orders_rule_against_hand_computation():
    # Per pair: (verdict with the answer first, verdict with the reference first) -> score by hand.
    cases = [
        ("first", "second", 1.0),  # answer wins both orders
        ("second", "first", 0.0),  # loses both
        ("tie", "tie", 0.5),
        ("first", "first", 0.5),  # position-dependent
        ("second", "second", 0.5),  # position-dependent
        ("first", "tie", 0.5),
        ("first", "second", 1.0),
    ]
    judge = ScriptedJudge([v for a, b, _ in cases for v in (a, b)])
    prompts = [f"p{i}" for i in range(len(cases))]
    answers = [f"ans{i}" for i in range(len(cases))]
    refs = [f"ref{i}" for i in range(len(cases))]
    out = win_rate(prompts, answers, refs, judge)
    # The judge saw the answer first, then the reference first, for each pair.
    assert judge.calls[0] == ("p0", "ans0", "ref0") and judge.calls[1] == ("p0", "ref0", "ans0")
    assert out["scores"] == [s for *_, s in cases]
    assert out["value"] == pytest.approx(100 * 4 / 7)  # (2 wins + 4 halves) / 7
    assert (out["wins"], out["ties"], out["losses"]) == (2, 4, 1)
    assert out["position_inconsistent"] == 2
    assert out["verdicts"][3] == ["first", "first"]
    assert out["judge"]["name"] == "scripted"


def test_position_biased_judge_scores_exactly_half():
    class AlwaysFirst:
        def prefer(self, prompt, first, second):
            return "first"

        def describe(self):
            return {"name": "always-first"}

    out = win_rate(["a", "b", "c"], ["x", "much longer answer", ""], ["y", "z", "w"], AlwaysFirst())
    assert out["value"] == 50.0
    assert (out["wins"], out["ties"], out["losses"]) == (0, 3, 0)
    assert out["position_inconsistent"] == 3


def test_interval_and_counts_with_stand_in_judge(longer_judge):
    assert isinstance(longer_judge, PairwiseJudge)
    answers = ["long answer", "long answer", "long answer", "s", "same"]
    refs = ["short", "short", "short", "longer ref", "four"]
    out = win_rate(["q"] * 5, answers, refs, longer_judge)
    assert out["scores"] == [1.0, 1.0, 1.0, 0.0, 0.5]
    assert (out["wins"], out["ties"], out["losses"], out["n"]) == (3, 1, 1, 5)
    assert out["value"] == pytest.approx(70.0)
    lo, hi = out["ci95"]
    assert (lo, hi) == pytest.approx(wilson_interval(3.5, 5))
    assert 0.0 < lo < 70.0 < hi < 100.0
    # Sample standard error of [1,1,1,0,.5] by hand: squared deviations from .7 sum to .8, var = .8/4, se = sqrt(.2/5).
    assert out["se"] == pytest.approx(20.0)
    # All wins: the interval does not collapse to a point.
    out = win_rate(["q"] * 4, ["long answer"] * 4, ["s"] * 4, longer_judge)
    assert out["value"] == 100.0 and out["ci95"][1] == 100.0 and out["ci95"][0] < 100.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="aligned"):
        win_rate(["a"], ["x", "y"], ["r"], ScriptedJudge([]))
    with pytest.raises(ValueError, match="one of"):
        pair_score("maybe", "first")
    out = win_rate([], [], [], ScriptedJudge([]))
    assert out["n"] == 0 and out["ci95"] == [0.0, 100.0]


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_openai_compatible_judge(monkeypatch, caplog):
    secret = "sk-test-SECRET-123"
    monkeypatch.setenv("MY_JUDGE_KEY", secret)
    sent = []
    replies = iter(["Output (a)", "Output (b)", "I cannot decide"])

    def fake_urlopen(request, timeout=None):
        sent.append(request)
        reply = {
            "model": "judge-x-2025-01-01",
            "system_fingerprint": "fp_1",
            "choices": [{"message": {"role": "assistant", "content": next(replies)}}],
        }
        return FakeResponse(json.dumps(reply).encode())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    caplog.set_level(logging.DEBUG)
    judge = OpenAICompatibleJudge(
        "judge-x", base_url="http://localhost:9/v1/", version="2025-01-01", api_key_env="MY_JUDGE_KEY"
    )
    assert judge.prefer("p", "A", "B") == "first"
    assert judge.prefer("p", "B", "A") == "second"
    assert judge.prefer("p", "A", "B") == "tie"
    request = sent[0]
    assert request.full_url == "http://localhost:9/v1/chat/completions"
    body = json.loads(request.data)
    assert body["model"] == "judge-x" and body["temperature"] == 0
    assert "## Output (a)\nA" in body["messages"][0]["content"]
    assert request.get_header("Authorization") == f"Bearer {secret}"
    description = judge.describe()
    assert description["model"] == "judge-x" and description["version"] == "2025-01-01"
    assert description["served_models"] == ["judge-x-2025-01-01"] and description["unparsed"] == 1
    assert secret not in json.dumps(description) and secret not in repr(judge)
    assert secret not in caplog.text
    assert any("judge-x" in r.getMessage() for r in caplog.records)  # the log was on, it just holds no key


def test_openai_compatible_judge_missing_key(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(FtguardError, match="NO_SUCH_JUDGE_KEY") as err:
        OpenAICompatibleJudge("judge-x", api_key_env="NO_SUCH_JUDGE_KEY")
    assert "\n" not in str(err.value)


def test_label_parsing():
    assert winrate._label("Output (b)") == "second"
    assert winrate._label("a") == "first"
    assert winrate._label("output(a) is better") == "first"
    assert winrate._label("Output (a) and Output (b)") is None
    assert winrate._label("neither") is None


def test_local_lm_judge_on_tiny_model():
    judge = LocalLMJudge("tiny")
    prompts = ["Name a colour.", "Add two and two."]
    answers = ["Blue.", "Four."]
    refs = ["Red is a colour.", "2 + 2 = 4"]
    first = win_rate(prompts, answers, refs, judge)
    again = win_rate(prompts, answers, refs, judge)
    assert first["verdicts"] == again["verdicts"] and first["scores"] == again["scores"]
    assert all(v in ("first", "second", "tie") for pair in first["verdicts"] for v in pair)
    gap = judge.logit_gap(prompts[0], answers[0], refs[0])
    assert judge.prefer(prompts[0], answers[0], refs[0]) == ("first" if gap > 0 else "second")
    assert first["judge"]["name"] == "local-lm" and first["judge"]["model"] == "tiny"
    # A margin wider than any gap makes every verdict a tie.
    wide = LocalLMJudge("tiny", tie_margin=1e9)
    assert wide.prefer(prompts[0], answers[0], refs[0]) == "tie"
