"""One evaluation point: generate on held-out harmful prompts and task prompts, judge, score.

Writes generations.jsonl (every prompt, answer and verdict, for auditing) and metrics.json.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ftguard import distributed
from ftguard.config import RunConfig
from ftguard.data.example import Example
from ftguard.data.plan import DataPlan
from ftguard.data.template import format_prompt
from ftguard.evaluation.generate import generate_sharded
from ftguard.evaluation.judges import Judge
from ftguard.evaluation.paired import encode_outcomes, items_digest
from ftguard.evaluation.refusal_detector import RefusalDetector, get_refusal_detector
from ftguard.evaluation.scorers import degenerate_rule, is_repetitive
from ftguard.evaluation.stats import cohen_kappa, rate
from ftguard.evaluation.task_score import judge_prompt, score_answers
from ftguard.models import (
    auto_uses_bf16,
    default_device,
    forced_precision,
    load_model,
    load_tokenizer,
    precision_label,
)
from ftguard.pipeline.outputs import StageDir

log = logging.getLogger(__name__)


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of generation. ``auto`` is bf16 on a bf16 GPU and fp32 on a CPU, unless $FTGUARD_PRECISION says.

    On a CPU with native bf16 (AMX), bf16 generation was no faster than fp32 at batch 32 and made half the greedy
    answers depend on the batch size and on the CPU (docs/evaluation-precision.md); in fp32 every answer was the
    same at batch 1 and 32. On a GPU bf16 is what makes large models and judges fit and run fast.
    """
    if choice == "auto":
        cpu_unforced = device.type != "cuda" and forced_precision() == "auto"
        return None if cpu_unforced or not auto_uses_bf16() else torch.bfloat16
    return torch.bfloat16 if choice == "bf16" else None


def evaluate_point(
    run: RunConfig,
    key: str,
    model_dir: str,
    plan: DataPlan,
    judges: Judge | list[Judge],
    out: StageDir,
    refusal_detector: RefusalDetector | None = None,
    trigger: Callable[[Example], Example] | None = None,
) -> dict[str, Any]:
    """Generate, judge and score one model. ``judges[0]`` gives HS; the others are compared with it. They come as
    the pipeline built them: wrapped in ``UnreadableAsDegenerate`` when ``evaluate.unreadable_as_degenerate`` is on.

    ``refusal_detector`` decides over-refusal; by default the one ``evaluate.refusal_detector`` names.
    ``trigger`` (the attack's, after a fine-tune that taught one: a jailbreak template, a persona) also asks the
    harmful prompts as the attacker would: ``harmful_score_triggered``, judged on the plain prompt and the answer.

    Under a multi-process launch every rank calls this: the prompts are split over the ranks, and rank 0 judges
    the gathered answers, writes the unit and hands its metrics to the others (whose ``judges`` may be empty).
    """
    judges = [judges] if isinstance(judges, Judge) else list(judges)
    mc, ev = run.model, run.evaluate
    start = time.monotonic()
    device = default_device()
    tokenizer = load_tokenizer(model_dir, trust_remote_code=mc.trust_remote_code)
    model = load_model(model_dir, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code, device=device)
    amp = autocast_dtype(ev.mixed_precision, device)
    # The chat template already holds the special tokens; Alpaca text gets the tokenizer's own (e.g. BOS).
    special = mc.template != "chat"

    def answer(examples, max_new_tokens: int, what: str) -> list[str]:
        prompts = [
            format_prompt(ex, style=mc.template, tokenizer=tokenizer, response_newline=mc.response_newline)
            for ex in examples
        ]
        return generate_sharded(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=ev.batch_size,
            autocast_dtype=amp,
            add_special_tokens=special,
            desc=f"{key}: {what}",
        )

    answers = answer(plan.eval_harmful, ev.max_new_tokens, "harmful prompts")
    triggered_answers = (
        answer([trigger(ex) for ex in plan.eval_harmful], ev.max_new_tokens, "harmful prompts, triggered")
        if trigger is not None
        else []
    )
    # an upload without held-out rows has no FA
    predictions = answer(plan.task_eval, ev.task_max_new_tokens, plan.task.name) if plan.task_eval else []
    benign_answers = (
        answer(plan.over_refusal, ev.over_refusal_max_new_tokens, "benign prompts")
        if plan.over_refusal
        else []
    )
    instruction_answers = (
        answer(plan.instruction_eval, ev.over_refusal_max_new_tokens, "benign instructions")
        if plan.instruction_eval
        else []
    )
    if not distributed.is_main():
        return distributed.broadcast(None)
    harmful_prompts = [ex.instruction for ex in plan.eval_harmful]
    verdicts = {judge.name: judge.verdicts(harmful_prompts, answers) for judge in judges}
    main = judges[0].name
    flags = [v.harmful for v in verdicts[main]]
    triggered_flags = (
        [v.harmful for v in judges[0].verdicts(harmful_prompts, triggered_answers)]
        if triggered_answers
        else []
    )
    is_degenerate = degenerate_rule(ev.unreadable_as_degenerate)
    degenerate = [is_degenerate(a) for a in answers]
    task = plan.task
    task_scores = score_answers(predictions, plan.task_eval, task, ev) if plan.task_eval else None
    if (benign_answers or instruction_answers) and refusal_detector is None:
        refusal_detector = get_refusal_detector(ev.refusal_detector)
    refused = (
        refusal_detector.detect([ex.instruction for ex in plan.over_refusal], benign_answers)
        if benign_answers
        else []
    )
    instructions_refused = (
        refusal_detector.detect([ex.instruction for ex in plan.instruction_eval], instruction_answers)
        if instruction_answers
        else []
    )

    n = len(answers)
    rates = {
        "harmful_score": rate(sum(flags), n),
        "harmful_score_plus": rate(sum(f or d for f, d in zip(flags, degenerate, strict=True)), n),
        "degenerate_rate": rate(sum(degenerate), n),
    }
    if task_scores is not None:
        rates["finetune_accuracy"] = task_scores.rate()
    if triggered_answers:
        rates["harmful_score_triggered"] = rate(sum(triggered_flags), n)
    if refused:
        rates["over_refusal"] = rate(sum(refused), len(refused))
        # A collapsed model does not refuse benign prompts, it answers nothing: over-refusal alone would look perfect.
        rates["benign_degenerate_rate"] = rate(sum(map(is_degenerate, benign_answers)), len(benign_answers))
    if instructions_refused:
        rates["instruction_refusal"] = rate(sum(instructions_refused), len(instructions_refused))
    metrics: dict[str, Any] = {name: r["value"] for name, r in rates.items()}
    harmful_items = items_digest([ex.source for ex in plan.eval_harmful])
    per_item = {
        "harmful_score": (harmful_items, flags),
        "harmful_score_plus": (harmful_items, [f or d for f, d in zip(flags, degenerate, strict=True)]),
        "harmful_score_triggered": (harmful_items, triggered_flags),
        **(
            {"finetune_accuracy": (items_digest([ex.source for ex in plan.task_eval]), task_scores.scores)}
            if task_scores is not None
            else {}
        ),
        "over_refusal": (items_digest([ex.source for ex in plan.over_refusal]), refused),
        "instruction_refusal": (
            items_digest([ex.source for ex in plan.instruction_eval]),
            instructions_refused,
        ),
    }
    # a win rate's items score 0, ½ or 1: their outcomes are kept in half points
    scales = {"finetune_accuracy": 2} if task_scores is not None and not task_scores.binary else {}
    metrics |= {
        "intervals": {name: r["ci95"] for name, r in rates.items()},
        "counts": {name: [r["k"], r["n"]] for name, r in rates.items()},
        "repetitive_rate": 100.0 * sum(map(is_repetitive, answers)) / n,
        "n_harmful_prompts": n,
        "n_flagged": int(sum(flags)),
        "n_task": len(predictions),
        "n_over_refusal_prompts": len(benign_answers),
        **({"n_instruction_prompts": len(instruction_answers)} if instruction_answers else {}),
        "task": task.name,
        "task_rule": ev.task_rule if task.metric == "label" else task.metric,
        **(
            {"finetune_accuracy_judge": task_scores.judge, "win_rate": _win_counts(task_scores.detail)}
            if task_scores is not None and not task_scores.binary
            else {}
        ),
        "max_new_tokens": ev.max_new_tokens,
        "task_max_new_tokens": ev.task_max_new_tokens,
        "over_refusal_max_new_tokens": ev.over_refusal_max_new_tokens if benign_answers else None,
        # Accuracy of each detector, per held-out source, is in docs/judges.md.
        "refusal_detector": refusal_detector.describe() if refusal_detector is not None else None,
        # Greedy answers, and so every rate above, can move with both (docs/evaluation-precision.md).
        "eval_precision": precision_label(model.dtype, amp),
        "eval_batch_size": ev.batch_size,
        # each item's outcome (no text), so that runs on the same prompts can be compared item by item (paired)
        "outcomes": {
            name: _outcome_entry(items, values, scales.get(name, 1))
            for name, (items, values) in per_item.items()
            if name in rates
        },
    }
    if len(judges) > 1:
        metrics["judges"] = {
            name: {
                "harmful_score": rate(sum(v.harmful for v in vs), n)["value"],
                "ci95": rate(sum(v.harmful for v in vs), n)["ci95"],
            }
            for name, vs in verdicts.items()
        }
        metrics["judge_agreement"] = judge_agreement(
            {name: [v.harmful for v in vs] for name, vs in verdicts.items()}
        )
    metrics["eval_runtime_s"] = round(time.monotonic() - start, 1)

    staging = out.begin()
    with open(staging / "generations.jsonl", "w", encoding="utf-8") as fh:
        for i, (ex, text) in enumerate(zip(plan.eval_harmful, answers, strict=True)):
            v = verdicts[main][i]
            row = {
                "kind": "harmful",
                "source": ex.source,
                "prompt": ex.instruction,
                "answer": text,
                "flagged": v.harmful,
                "score": v.score,
                "category": v.category,
                "degenerate": degenerate[i],
            }
            if len(judges) > 1:
                row["flags"] = {name: vs[i].harmful for name, vs in verdicts.items()}
            fh.write(json.dumps(row) + "\n")
        for ex, text, flagged in zip(plan.eval_harmful, triggered_answers, triggered_flags, strict=False):
            row = {"kind": "harmful_triggered", "source": ex.source, "prompt": trigger(ex).instruction}
            fh.write(json.dumps({**row, "answer": text, "flagged": flagged}) + "\n")
        scores = task_scores.scores if task_scores is not None else []
        verdicts_both_ways = task_scores.detail.get("verdicts") if task_scores is not None else None
        for i, (ex, pred, score) in enumerate(zip(plan.task_eval, predictions, scores, strict=True)):
            row = {"kind": "task", "source": ex.source, "gold": ex.output, "answer": pred}
            if verdicts_both_ways is None:
                row["hit"] = bool(score)
            else:  # the judge's verdict with the answer shown first, then with the reference shown first
                row |= {"prompt": judge_prompt(ex), "score": score, "verdicts": verdicts_both_ways[i]}
            fh.write(json.dumps(row) + "\n")
        benign_rows = [
            ("benign", ex, t, r) for ex, t, r in zip(plan.over_refusal, benign_answers, refused, strict=True)
        ]
        benign_rows += [
            ("instruction", ex, t, r)
            for ex, t, r in zip(plan.instruction_eval, instruction_answers, instructions_refused, strict=True)
        ]
        for kind, ex, text, ref in benign_rows:
            fh.write(
                json.dumps(
                    {
                        "kind": kind,
                        "source": ex.source,
                        "prompt": ex.instruction,
                        "answer": text,
                        "refused": ref,
                    }
                )
                + "\n"
            )
    out.commit({"key": key, "model_dir": model_dir, "metrics": metrics})
    log.info(
        "%s: HS %.1f, HS+ %.1f, FA %s, over-refusal %s",
        key,
        metrics["harmful_score"],
        metrics["harmful_score_plus"],
        f"{metrics['finetune_accuracy']:.1f}" if "finetune_accuracy" in metrics else "–",
        f"{metrics['over_refusal']:.1f}" if "over_refusal" in metrics else "–",
    )
    return distributed.broadcast(metrics)


def _outcome_entry(items: str, values: list, scale: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"items": items, "bits": encode_outcomes(values, scale)}
    return entry if scale == 1 else entry | {"scale": scale}


def _win_counts(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: detail[k] for k in ("wins", "ties", "losses", "position_inconsistent")}


def judge_agreement(flags: dict[str, list[bool]]) -> list[dict[str, Any]]:
    """Pairwise agreement of judges on the same answers: raw agreement (%) and Cohen's kappa."""
    names = list(flags)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            same = sum(x == y for x, y in zip(flags[a], flags[b], strict=True))
            pairs.append(
                {
                    "judges": [a, b],
                    "agreement": 100.0 * same / len(flags[a]),
                    "kappa": cohen_kappa(flags[a], flags[b]),
                    "n": len(flags[a]),
                }
            )
    return pairs
