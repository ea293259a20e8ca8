"""GPU-hour estimates for ``ftguard sweep --dry-run``: FLOPs counted from a run config, time from a GpuSpec.

A coarse model, good to a factor of about 1.5 (the inputs marked as guesses below dominate the error):

- Training: tokens = optimizer steps × global batch × ``model.max_length`` × ``gpu.token_fill``. FLOPs per token:
  LoRA 4·N (forward 2N + activation gradients 2N; the LoRA weight gradients are negligible), full fine-tuning
  6·N (plus weight gradients 2N), +2·N with gradient checkpointing (one more forward); times the method's pass
  factor relative to SFT (each method's ``pass_factor``). Time = FLOPs / (peak × MFU).
- Generation: prefill is compute-bound (2·N per prompt token at MFU); each decoding step reads every weight once,
  shared by a batch of ``evaluate.batch_size`` sequences: N × bytes per weight / (bandwidth × efficiency), or the
  batch's 2·N FLOPs per sequence when that is slower. Every answer is counted at its full ``max_new_tokens`` (an
  upper bound: a batch stops early only when all its answers end).
- GPU hours = seconds of one GPU's work / 3600, so they do not depend on ``gpu.count`` for a fixed amount of
  work; the wall time is about GPU hours / count.

Not counted: model loading, merging and saving, data preparation, attention's quadratic term (about 1% of the
FLOPs at 256 tokens for a 7B model), KV-cache reads while decoding, and idle time between stages.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ftguard.cost import (
    ALPACA_EVAL_PROMPTS,
    DEFAULT_HARMFUL_PROMPTS,
    PROMPT_TOKENS,
    TASK_EVAL_ROWS,
    XSTEST_SAFE,
    GpuSpec,
    alignment_n,
    cost_result,
    generation,
    judge_pass,
    model_parameters,
    train_seconds,
)
from ftguard.errors import FtguardError

if TYPE_CHECKING:
    from ftguard.config import RunConfig
    from ftguard.resolve import ResolvedRun


def _stage_config(run: RunConfig, stage: str) -> Any:
    if stage not in ("align", "finetune", "post"):
        raise FtguardError(f"unknown stage '{stage}': use align, finetune or post")
    return getattr(run, stage)


def _tokens_of(train: Any, samples: int, max_length: int, gpu: GpuSpec) -> tuple[int, int]:
    """(optimizer steps, tokens) of one stage: ``max_steps``, else ``epochs`` over ``samples``."""
    if train.max_steps > 0:
        steps = train.max_steps
        micro_batches = steps * train.grad_accum  # per device
    else:
        # Each device reads ceil(samples / (batch · devices)) micro-batches per epoch (the last one partial, counted
        # full); a last incomplete accumulation window still steps the optimizer.
        micro_batches = math.ceil(train.epochs * math.ceil(samples / (train.batch_size * gpu.count)))
        steps = math.ceil(micro_batches / train.grad_accum)
    tokens = round(micro_batches * train.batch_size * gpu.count * max_length * gpu.token_fill)
    return steps, tokens


def _flops_per_token(run: RunConfig, train: Any, n_params: float, stage: str) -> tuple[float, str]:
    full = run.adapter.trains_full(stage)
    per_token = (6.0 if full else 4.0) * n_params
    what = "full fine-tuning 6N" if full else "LoRA 4N"
    if train.gradient_checkpointing:
        per_token += 2.0 * n_params
        what += " + 2N (gradient checkpointing)"
    return per_token, what


def _training_rate(train: Any, run: RunConfig, gpu: GpuSpec) -> tuple[float, str]:
    if train.mixed_precision == "no" and run.model.dtype == "float32":
        return gpu.fp32_tflops, "fp32"
    return gpu.peak_tflops, "bf16"


def stage_cost(resolved: ResolvedRun, stage: str, gpu: GpuSpec) -> dict[str, Any]:
    """Cost of one align, finetune (one harmful ratio) or post unit of ``resolved``, from its method's own facts
    (``pass_factor``, ``extra_cost``; a post method's ``cost``).

    Returns ``{"gpu_hours", "tokens", "flops", "assumptions"}``.
    """
    run = resolved.config
    cfg = _stage_config(run, stage)
    if cfg is None:
        return cost_result(0.0, 0, 0.0, [f"{stage} stage is null"])
    method = resolved.method(stage)
    n_params = model_parameters(run, gpu)
    if stage == "post":
        return method.cost(run, n_params, gpu)

    notes = [f"{run.model.name} N={n_params:.3g}"]
    extra = method.extra_cost(run, stage)
    judge_seconds = judge_flops = 0.0
    judge_tokens = 0
    for judge, options, answers in extra.judge_reads:
        tokens, flops, seconds, note = judge_pass(judge, options, answers, run.model.max_length, gpu)
        judge_tokens, judge_flops, judge_seconds = (
            judge_tokens + tokens,
            judge_flops + flops,
            judge_seconds + seconds,
        )
        notes.append(f"{cfg.method}: {note}")
    if stage == "align":
        samples, note = alignment_n(run)
        notes.append(note)
    else:
        samples = run.data.finetune.n
    samples += extra.samples
    notes += extra.notes
    steps, tokens = _tokens_of(cfg.train, samples, run.model.max_length, gpu)
    per_token, what = _flops_per_token(run, cfg.train, n_params, stage)
    factor = method.pass_factor
    flops = tokens * per_token * factor + extra.one_off_tokens * per_token
    rate, precision = _training_rate(cfg.train, run, gpu)
    seconds = train_seconds(flops, rate, gpu) + judge_seconds
    notes.append(
        f"{stage} {cfg.method}: {steps} steps, {tokens:,} tokens ({samples} samples, max_length "
        f"{run.model.max_length} × fill {gpu.token_fill:g}); {what} FLOPs/token × pass factor {factor:g}; "
        f"{precision} at MFU {gpu.train_mfu:g}"
    )
    return cost_result(seconds, tokens + extra.one_off_tokens + judge_tokens, flops + judge_flops, notes)


def eval_cost(resolved: ResolvedRun, gpu: GpuSpec) -> dict[str, Any]:
    """Cost of one evaluation point (HS answers + judges, over-refusal answers, task answers) of ``resolved``."""
    run = resolved.config
    ev = run.evaluate
    n_params = model_parameters(run, gpu)
    bytes_per_weight = 4 if run.model.dtype == "float32" else 2
    fp32 = run.model.dtype == "float32" and ev.mixed_precision == "no"
    rate = gpu.fp32_tflops if fp32 else gpu.peak_tflops
    notes = [f"{run.model.name} N={n_params:.3g}, {bytes_per_weight} bytes/weight"]

    n_harmful = ev.harmful_prompts.n
    if n_harmful is None:
        n_harmful = DEFAULT_HARMFUL_PROMPTS
        notes.append(f"evaluate.harmful_prompts.n null: guessed {n_harmful}")
    parts = [("HS", n_harmful, PROMPT_TOKENS["harmful"], ev.max_new_tokens)]
    if ev.instruction_prompts is not None:
        n_instructions = ev.instruction_prompts.n or ALPACA_EVAL_PROMPTS
        parts.append(
            ("instruction refusal", n_instructions, PROMPT_TOKENS["benign"], ev.over_refusal_max_new_tokens)
        )
    if ev.over_refusal_prompts is not None:
        n_benign = ev.over_refusal_prompts.n or XSTEST_SAFE
        parts.append(("over-refusal", n_benign, PROMPT_TOKENS["benign"], ev.over_refusal_max_new_tokens))
    task = run.data.finetune.task
    rows = TASK_EVAL_ROWS.get(task, 1000)
    n_task = rows if ev.task_n is None else min(ev.task_n, rows)
    parts.append((f"FA {task}", n_task, PROMPT_TOKENS.get(task, 96), ev.task_max_new_tokens))

    seconds = flops = 0.0
    tokens = 0
    for what, n, prompt, new in parts:
        s, t, f = generation(n_params, n, prompt, new, ev.batch_size, bytes_per_weight, rate, gpu)
        seconds, tokens, flops = seconds + s, tokens + t, flops + f
        notes.append(f"{what}: {n} prompts × {new} new tokens at batch {ev.batch_size}")
    for i, judge in enumerate([ev.judge, *ev.extra_judges]):
        options = ev.judge_options if i == 0 else {}
        t, f, s, note = judge_pass(judge, options, n_harmful, ev.max_new_tokens, gpu)
        seconds, tokens, flops = seconds + s, tokens + t, flops + f
        notes.append(note)
    notes.append(
        f"decoding at {gpu.decode_efficiency:g} of {gpu.memory_bandwidth_gbs:g} GB/s, every answer at full length"
    )
    return cost_result(seconds, tokens, flops, notes)
