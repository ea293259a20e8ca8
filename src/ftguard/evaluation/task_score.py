"""Task score (FA, %): the per-example scoring that evaluation and the post-stage repairs share.

``score_answers`` scores generated answers by the task's metric: a label or GSM8K hit (1 or 0), or a win against
the reference answer judged both ways round (1, ½ or 0; ``evaluation.winrate``). ``task_score`` generates and
scores an in-memory model: post-stage repairs use it on ``plan.task_validation`` (task train examples outside
every upload) to check that the repair keeps the task; ``task_eval`` stays untouched for the final evaluation.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from ftguard.data.example import Example
from ftguard.data.template import format_prompt
from ftguard.errors import FtguardError
from ftguard.evaluation.generate import generate
from ftguard.evaluation.scorers import task_hits
from ftguard.evaluation.stats import rate, wilson_interval
from ftguard.evaluation.winrate import PairwiseJudge, get_pairwise_judge, win_rate


@dataclass
class TaskScores:
    """Per-example scores in [0, 1] (binary unless the metric is a win rate) and what the judge recorded."""

    scores: list[float]
    binary: bool
    judge: dict[str, Any] | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # win rate: wins, ties, losses, verdicts per example

    @property
    def value(self) -> float:
        return 100.0 * sum(self.scores) / len(self.scores)

    def rate(self) -> dict[str, Any]:
        """Percent, 95% interval and counts, like every reported rate; a win rate counts a tie as half a win."""
        if self.binary:
            return rate(int(sum(self.scores)), len(self.scores))
        k, n = sum(self.scores), len(self.scores)
        return {"value": self.value, "ci95": list(wilson_interval(k, n)), "k": k, "n": n}  # type: ignore[arg-type]


@functools.lru_cache(maxsize=2)
def _cached_judge(name: str, options_json: str) -> PairwiseJudge:
    # A local judge model loads once per process, not once per evaluation point.
    return get_pairwise_judge(name, **json.loads(options_json))


def pairwise_judge(evaluate: Any) -> PairwiseJudge:
    """The judge ``evaluate.pairwise_judge`` names, built once per process."""
    if evaluate.pairwise_judge is None:
        raise FtguardError(
            "a win-rate task needs evaluate.pairwise_judge (local-lm or openai-compatible) and its options"
        )
    return _cached_judge(evaluate.pairwise_judge, json.dumps(evaluate.pairwise_judge_options, sort_keys=True))


def judge_prompt(example: Example) -> str:
    """What the judge reads as the instruction: the user's request with its input, as the answerer saw it."""
    return f"{example.instruction}\n\n{example.input}" if example.input else example.instruction


def score_answers(predictions: list[str], examples: list[Example], task: Any, evaluate: Any) -> TaskScores:
    """Score aligned answers to ``examples`` by ``task.metric`` under the run's ``evaluate`` settings."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} answers for {len(examples)} task examples")
    golds = [ex.output for ex in examples]
    if task.metric == "winrate":
        if not examples:
            raise FtguardError("win rate of an empty evaluation set: evaluate at least one example")
        judge = pairwise_judge(evaluate)
        if hasattr(judge, "reset"):  # the judge lives for the process: record this evaluation's calls only
            judge.reset()
        result = win_rate([judge_prompt(ex) for ex in examples], predictions, golds, judge)
        detail = {k: result[k] for k in ("wins", "ties", "losses", "position_inconsistent", "verdicts")}
        return TaskScores(result["scores"], binary=False, judge=result["judge"], detail=detail)
    hits = task_hits(
        predictions,
        golds,
        metric=task.metric,
        rule=evaluate.task_rule,
        aliases=dict(task.aliases) if task.aliases else None,
    )
    return TaskScores([float(h) for h in hits], binary=True)


def task_score(
    model: Any, tokenizer: Any, run: Any, task: Any, examples: list[Example], *, progress: bool = False
) -> float:
    """FA in percent of greedy answers (``run.evaluate.task_max_new_tokens`` new tokens, the run's template/rule)."""
    if not examples:
        raise FtguardError("task score on no examples: set post.validation_n ≥ 1")
    mc, ev = run.model, run.evaluate
    prompts = [
        format_prompt(ex, style=mc.template, tokenizer=tokenizer, response_newline=mc.response_newline)
        for ex in examples
    ]
    # Chat templates already carry the special tokens (as in pipeline/evaluation.py).
    predictions = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=ev.task_max_new_tokens,
        batch_size=ev.batch_size,
        add_special_tokens=mc.template != "chat",
        desc="task score",
        progress=progress,
    )
    return score_answers(predictions, examples, task, ev).value
