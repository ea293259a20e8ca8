"""Task score (FA, %) of an in-memory model on a list of task examples, scored exactly like evaluation does.

Post-stage repairs use it on ``plan.task_validation`` (task train examples outside every upload) to check that
the repair keeps the task; ``task_eval`` stays untouched for the final evaluation.
"""

from __future__ import annotations

from typing import Any

from ftguard.data.example import Example
from ftguard.data.template import format_prompt
from ftguard.errors import FtguardError
from ftguard.evaluation.generate import generate
from ftguard.evaluation.scorers import task_hits


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
    hits = task_hits(
        predictions,
        [ex.output for ex in examples],
        metric=task.metric,
        rule=ev.task_rule,
        aliases=dict(task.aliases) if task.aliases else None,
    )
    return 100.0 * sum(hits) / len(hits)
