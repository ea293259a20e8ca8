"""One evaluation point: generate on held-out harmful prompts and task prompts, judge, score.

Writes generations.jsonl (every prompt, answer and verdict, for auditing) and metrics.json.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from ftguard.config import RunConfig
from ftguard.data.template import format_prompt
from ftguard.evaluation.generate import generate
from ftguard.evaluation.judges import Judge
from ftguard.evaluation.scorers import (
    finetune_accuracy,
    harmful_score,
    harmful_score_plus,
    is_degenerate,
    is_repetitive,
)
from ftguard.models import default_device, fast_bf16_available, load_model, load_tokenizer
from ftguard.pipeline.outputs import StageDir
from ftguard.pipeline.plan import DataPlan

log = logging.getLogger(__name__)


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "auto":
        return torch.bfloat16 if fast_bf16_available() and device.type in ("cuda", "cpu") else None
    return torch.bfloat16 if choice == "bf16" else None


def evaluate_point(
    run: RunConfig, key: str, model_dir: str, plan: DataPlan, judge: Judge, out: StageDir
) -> dict[str, Any]:
    mc, ev = run.model, run.evaluate
    start = time.monotonic()
    device = default_device()
    tokenizer = load_tokenizer(model_dir, trust_remote_code=mc.trust_remote_code)
    model = load_model(model_dir, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code, device=device)
    amp = autocast_dtype(ev.mixed_precision, device)

    def prompts_of(examples):
        return [format_prompt(ex, style=mc.template, tokenizer=tokenizer, response_newline=mc.response_newline) for ex in examples]

    # The chat template already holds the special tokens; Alpaca text gets the tokenizer's own (e.g. BOS).
    special = mc.template != "chat"
    answers = generate(
        model, tokenizer, prompts_of(plan.eval_harmful), max_new_tokens=ev.max_new_tokens,
        batch_size=ev.batch_size, autocast_dtype=amp, add_special_tokens=special, desc=f"{key}: harmful prompts",
    )
    verdicts = judge.verdicts([ex.instruction for ex in plan.eval_harmful], answers)
    flags = [v.harmful for v in verdicts]
    predictions = generate(
        model, tokenizer, prompts_of(plan.task_eval), max_new_tokens=ev.task_max_new_tokens,
        batch_size=ev.batch_size, autocast_dtype=amp, add_special_tokens=special, desc=f"{key}: {plan.task.name}",
    )
    golds = [ex.output for ex in plan.task_eval]
    task = plan.task
    fa = finetune_accuracy(
        predictions, golds, metric=task.metric, rule=ev.task_rule, aliases=dict(task.aliases) if task.aliases else None
    )
    metrics = {
        "harmful_score": harmful_score(flags),
        "harmful_score_plus": harmful_score_plus(flags, answers),
        "finetune_accuracy": fa,
        "degenerate_rate": 100.0 * sum(map(is_degenerate, answers)) / len(answers),
        "repetitive_rate": 100.0 * sum(map(is_repetitive, answers)) / len(answers),
        "n_harmful_prompts": len(answers),
        "n_flagged": int(sum(flags)),
        "n_task": len(predictions),
        "task": task.name,
        "task_rule": ev.task_rule if task.metric == "label" else task.metric,
        "max_new_tokens": ev.max_new_tokens,
        "task_max_new_tokens": ev.task_max_new_tokens,
        "eval_runtime_s": round(time.monotonic() - start, 1),
    }
    staging = out.begin()
    with open(staging / "generations.jsonl", "w", encoding="utf-8") as fh:
        for ex, answer, v in zip(plan.eval_harmful, answers, verdicts, strict=True):
            row = {"kind": "harmful", "source": ex.source, "prompt": ex.instruction, "answer": answer,
                   "flagged": v.harmful, "score": v.score, "category": v.category, "degenerate": v.degenerate}
            fh.write(json.dumps(row) + "\n")
        for ex, pred in zip(plan.task_eval, predictions, strict=True):
            fh.write(json.dumps({"kind": "task", "source": ex.source, "gold": ex.output, "answer": pred}) + "\n")
    out.commit({"key": key, "model_dir": model_dir, "metrics": metrics})
    del model
    log.info("%s: HS %.1f, HS+ %.1f, FA %.1f", key, metrics["harmful_score"], metrics["harmful_score_plus"], fa)
    return metrics
