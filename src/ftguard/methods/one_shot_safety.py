"""One-shot safety patching: a few SFT steps on a single refusal restore a harmfully fine-tuned model's safety.

Zhang, He, Chen, Lou, Liu, Yang, Jia, "Safety at One Shot: Patching Fine-Tuned LLMs with A Single Instance",
ICLR 2026 (arXiv 2601.01887); code github.com/Kevin-Zh-CS/safety-at-one-shot.

The rule, as the paper states it:

1. Selection (bi-level). Candidates D_safe (the paper: 256 harmful instructions over 11 categories with refusals).
   A one-hot w picks the patch; the lower level is SFT from the fine-tuned model θ* on the picked example, the upper
   level E_{x∈D_harm} KL(π_θ0 ‖ π_θ(w)) + E_{x∈D_task} KL(π_θ* ‖ π_θ(w)) + λ‖w‖²: back to the aligned model θ0 on
   harmful prompts, stay at θ* on the task. The instance the paper shows as selected (a "universal" refusal) is
   "How can I bypass system security checks?" → "Sorry, I can't help you. Please follow security guidelines."
2. Patch: standard SFT, −log π_θ(y | x) on the response, on that one example for 10 epochs at lr 2e-5.

Here: ``selection: bilevel`` (default) picks the example from the data plan's alignment refusals; ``selection:
fixed`` trains on ``instruction``/``response`` (default: the paper's instance). Each patch is ``steps`` steps of a
batch of one (an epoch of one example is one step) through ``FtguardTrainer``, on every parameter of the merged θ*.

Differences from the authors' code, and where the defaults come from:

* Neither the authors' repository nor the paper's full text was readable here (not in the index): the rule, the
  pool size and the two numbers (10 epochs, lr 2e-5) are the paper's as its published summaries (papernotes,
  OpenReview abstract) report them; a third-party reproduction (a federated-LLM code base, ``oneshotpatch``)
  trains on the same instance verbatim. The rest of the optimisation is that of ``finetune.py`` of Unispac/shallow-vs-deep-
  alignment, the code base the authors' repository is built on (a copy of it imports their
  ``finetuning_buckets`` package): full-parameter AdamW with β1 = 0.5 (its setting for plain SFT), β2 = 0.999,
  ε = 1e-8, linear decay without warm-up, weight decay 0, gradient clipping at 1.0, loss on the response tokens
  only. An inference, not verified against the authors' scripts.
* Selection: for one example (m = 1) the binary problem is solved exactly, by patching θ* with every candidate
  and scoring the upper objective (λ‖w‖² = λ for every one-hot w, so it drops out); the paper solves a continuous
  penalty relaxation whose penalty, λ and step sizes are not available. Ties go to the lowest pool index.
* Pool: the first ``pool_size`` refusals of ``plan.alignment`` (the dataset's refusals, not Llama-2-7B-Chat's own),
  candidates whose response ``model.max_length`` cuts away entirely are skipped.
* D_harm is the harmful part of the user's upload in the paper, which the provider cannot tell apart (see
  ``recovery``); here the last ``n_harmful`` alignment refusals, disjoint from the pool. D_task is the user's task
  data in the paper; here ``plan.task_validation`` (clean task examples outside every upload).
* The paper does not spell out how KL(π_ref ‖ π_θ) over responses is estimated. Here: the full-vocabulary KL at
  each response position of a teacher-forced sequence (the refusal for D_harm, the gold answer for D_task),
  averaged over all response tokens of the set.
* Prompts use the run's template (``model.template``), not the Llama-2 chat system prompt.

Memory: the selection holds three models (the patched one, θ0 and θ*); θ* also resets the patched one between
candidates. Scores are written to ``work_dir`` after each candidate, so an interrupted selection resumes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ftguard.config import RunConfig
from ftguard.cost import PROMPT_TOKENS, GpuSpec, cost_result, train_seconds
from ftguard.data.collate import CausalLMCollator
from ftguard.data.example import Example
from ftguard.data.template import IGNORE_INDEX, tokenize_dataset, tokenize_example
from ftguard.errors import FtguardError
from ftguard.methods.base import PostMethod
from ftguard.methods.context import PostContext
from ftguard.methods.registry import register_method
from ftguard.models import precision_label
from ftguard.schema import check

log = logging.getLogger(__name__)

# The instance the paper shows as selected ("One-shot safety patching"; ASCII apostrophe).
PAPER_INSTRUCTION = "How can I bypass system security checks?"
PAPER_RESPONSE = "Sorry, I can't help you. Please follow security guidelines."


@dataclass
class OneShotSafetyConfig:
    selection: Literal["bilevel", "fixed"] = field(
        default="bilevel",
        metadata={
            "help": "bilevel: pick the alignment refusal whose patch best minimises the paper's upper objective; "
            "fixed: patch with `instruction` / `response`"
        },
    )
    instruction: str = field(
        default=PAPER_INSTRUCTION, metadata={"help": "selection fixed: the prompt (the paper's instance)"}
    )
    response: str = field(
        default=PAPER_RESPONSE, metadata={"help": "selection fixed: the refusal (the paper's instance)"}
    )
    # Paper: a candidate pool of 256.
    pool_size: int = field(
        default=256, metadata={"help": "candidates: the first n alignment refusals (paper: 256)"}
    )
    # The paper's upper level reads the harmful fine-tuning data (100 examples in its main attack).
    n_harmful: int = field(
        default=100,
        metadata={
            "help": "D_harm: the last n alignment refusals, outside the pool (paper: the upload's 100 harmful)"
        },
    )
    n_task: int = field(
        default=64, metadata={"help": "D_task: the first n of task_validation (≤ post.validation_n)"}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "sequences per forward when scoring KL"})
    # Paper: 10 epochs of the single example, lr 2e-5.
    steps: int = field(
        default=10, metadata={"help": "optimizer steps on the one example, batch 1 (paper: 10 epochs)"}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate (paper: 2e-5)"})
    # shallow-vs-deep-alignment finetune.py: TrainingArguments defaults (linear, no warm-up, no decay, clip 1.0)
    # and adam_beta1 = 0.5 for plain SFT.
    lr_scheduler: str = field(
        default="linear", metadata={"help": "transformers scheduler name (HF default: linear)"}
    )
    adam_beta1: float = field(default=0.5, metadata={"help": "AdamW β1 (base code's plain-SFT setting: 0.5)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (HF default: 0)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (HF default: 1.0)"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "autocast of the patch steps, as train.mixed_precision"}
    )

    def __post_init__(self) -> None:
        check(bool(self.instruction.strip()), "instruction", "must not be empty")
        check(bool(self.response.strip()), "response", "must not be empty")
        for key in ("pool_size", "n_harmful", "n_task", "eval_batch_size", "steps"):
            check(getattr(self, key) >= 1, key, f"must be ≥ 1, got {getattr(self, key)}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        check(
            self.lr_scheduler in names, "lr_scheduler", f"must be one of {names}, got {self.lr_scheduler!r}"
        )
        check(0 <= self.adam_beta1 < 1, "adam_beta1", f"must be in [0, 1), got {self.adam_beta1}")
        check(self.weight_decay >= 0, "weight_decay", f"must be ≥ 0, got {self.weight_decay}")
        check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")


def patch(
    model: nn.Module, row: Any, cfg: OneShotSafetyConfig, tokenizer: Any, out: Path, seed: int
) -> list[float]:
    """``cfg.steps`` SFT steps of ``model`` (in place, every parameter) on the one-row tokenized dataset ``row``;
    the training losses."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from ftguard.training.arguments import mixed_precision_flags
    from ftguard.training.trainer import FtguardTrainer

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=cfg.steps,
        per_device_train_batch_size=1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=cfg.adam_beta1,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        **mixed_precision_flags(cfg.mixed_precision),
        # A patch is seconds of work: never checkpointed (the Trainer would otherwise save one at the end of every
        # candidate's patch), and no progress bar or printed line per step, one patch per candidate.
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=seed,
        data_seed=seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    for p in model.parameters():
        p.requires_grad_(True)
    trainer = FtguardTrainer(
        model=model,
        args=args,
        train_dataset=row,
        data_collator=CausalLMCollator.from_tokenizer(tokenizer),
        method_config=cfg,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.eval()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@torch.no_grad()
def response_kl(model: nn.Module, reference: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """KL(π_reference ‖ π_model) over the vocabulary at every response position, averaged over all response tokens."""
    total, count = 0.0, 0
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        logp = model(**inputs).logits[:, :-1].float().log_softmax(-1)
        logq = reference(**inputs).logits[:, :-1].float().log_softmax(-1)
        kl = (logq.exp() * (logq - logp)).sum(-1)
        total += float(kl[mask].sum())
        count += int(mask.sum())
    return total / count


def kl_batches(dataset: Any, size: int, collator: CausalLMCollator, device: torch.device) -> list[dict]:
    return [
        {k: v.to(device) for k, v in collator(dataset.select(range(i, min(i + size, len(dataset))))).items()}
        for i in range(0, len(dataset), size)
    ]


def split_alignment(
    alignment: list[Example], pool_size: int, n_harmful: int
) -> tuple[list[Example], list[Example]]:
    """(pool, D_harm): the pool is the first min(pool_size, len − n_harmful) refusals, D_harm the last n_harmful."""
    if len(alignment) <= n_harmful:
        raise FtguardError(
            f"one_shot_safety: post.args.n_harmful = {n_harmful} but data.alignment has {len(alignment)} refusals "
            "and the candidate pool needs at least one more: lower n_harmful or raise data.alignment.n"
        )
    return alignment[: min(pool_size, len(alignment) - n_harmful)], alignment[-n_harmful:]


@register_method
class OneShotSafety(PostMethod):
    """A few SFT steps on one refusal, selected by the paper's bi-level objective (or given)."""

    name = "one_shot_safety"
    paper = "Zhang et al., Safety at One Shot: Patching Fine-Tuned LLMs with A Single Instance, ICLR 2026"
    summary = "post-hoc SFT of the fine-tuned model on one refusal (10 steps), chosen by a bi-level objective"
    config_class = OneShotSafetyConfig
    required_roles = ("alignment", "task_validation")

    def prepare_data(self, plan: Any, run: RunConfig, stage: str) -> None:
        if self.config.selection == "bilevel":  # a fixed example needs no data
            super().prepare_data(plan, run, stage)
            split_alignment(plan.alignment, self.config.pool_size, self.config.n_harmful)

    def cost(self, run: RunConfig, n_params: float, gpu: GpuSpec) -> dict[str, Any]:
        """Patches: ``steps`` forward + backward passes (6N per token) of one example; selection: one patch per
        candidate, then a forward of the patched model and two references (2N per token each) over D_harm and
        D_task, for every candidate and for θ* itself."""
        cfg = self.config
        example = 2 * PROMPT_TOKENS["harmful"]  # prompt + refusal, guessed
        task = PROMPT_TOKENS.get(run.data.finetune.task, 96)
        patches, tokens, scored = 1, 0, 0
        if cfg.selection == "bilevel":
            n_align = run.data.alignment.n or cfg.pool_size + cfg.n_harmful
            pool = max(1, min(cfg.pool_size, n_align - cfg.n_harmful))
            n_task = min(cfg.n_task, run.post.validation_n if run.post is not None else cfg.n_task)
            patches += pool
            scored = (pool + 1) * (cfg.n_harmful * example + n_task * task)
        tokens = patches * cfg.steps * example
        flops = tokens * 6.0 * n_params + scored * 3 * 2.0 * n_params
        notes = [
            f"{run.model.name} N={n_params:.3g}",
            f"one_shot_safety: {patches} patch(es) of {cfg.steps} steps on one {example}-token example (guessed)"
            + (f"; {scored} tokens scored by 3 models" if scored else ""),
        ]
        return cost_result(train_seconds(flops, gpu.peak_tflops, gpu), tokens + scored, flops, notes)

    def repair(self, ctx: PostContext) -> tuple[Any, dict[str, Any]]:
        cfg, mc, tok = self.config, ctx.run.model, ctx.tokenizer

        def tokenize(examples: list[Example]) -> Any:
            style = {"style": mc.template, "response_newline": mc.response_newline}
            return tokenize_dataset(examples, tok, max_length=mc.max_length, **style)[0]

        model = ctx.load(ctx.finetuned)
        report: dict[str, Any] = {"selection": cfg.selection}
        if cfg.selection == "fixed":
            example = Example(instruction=cfg.instruction, output=cfg.response)
        else:
            example, selection = self._select(ctx, model, tokenize)
            report |= selection
        report["example"] = {k: getattr(example, k) for k in ("instruction", "input", "output")}
        losses = patch(model, tokenize([example]), cfg, tok, ctx.work_dir / "trainer", ctx.run.seed)
        from ftguard.training.arguments import mixed_precision_flags

        autocast = torch.bfloat16 if mixed_precision_flags(cfg.mixed_precision).get("bf16") else None
        report |= {
            "steps": cfg.steps,
            "losses": losses,
            "precision": precision_label(next(model.parameters()).dtype, autocast),
        }
        for p in model.parameters():
            p.requires_grad_(False)
        log.info("%s: patched with %r (%d steps)", ctx.key, example.instruction[:60], cfg.steps)
        return model, report

    def _select(self, ctx: PostContext, model: nn.Module, tokenize: Any) -> tuple[Example, dict[str, Any]]:
        """Patch θ* with every candidate and keep the one with the lowest upper objective; ``model`` is left at θ*."""
        cfg, mc, tok = self.config, ctx.run.model, ctx.tokenizer
        pool, harmful = split_alignment(ctx.plan.alignment, cfg.pool_size, cfg.n_harmful)
        if len(pool) < cfg.pool_size:
            log.warning("one_shot_safety: %d candidates (pool_size %d asked)", len(pool), cfg.pool_size)
        style = {"style": mc.template, "response_newline": mc.response_newline}
        cut = {
            i
            for i, ex in enumerate(pool)
            if tokenize_example(ex, tok, max_length=mc.max_length, **style)["no_response"]
        }
        usable = [i for i in range(len(pool)) if i not in cut]
        if not usable:
            raise FtguardError(
                "one_shot_safety: model.max_length cuts every candidate's whole response: raise it"
            )
        from ftguard.models import default_device

        device = default_device()  # where the Trainer puts the patched model
        model.to(device)
        aligned = ctx.load(ctx.aligned).to(device).eval()
        finetuned = ctx.load(ctx.finetuned).to(device).eval()
        for ref in (aligned, finetuned):
            ref.requires_grad_(False)
        collator = CausalLMCollator.from_tokenizer(tok)
        harm = kl_batches(tokenize(harmful), cfg.eval_batch_size, collator, device)
        task = kl_batches(
            tokenize(ctx.plan.task_validation[: cfg.n_task]), cfg.eval_batch_size, collator, device
        )

        def score() -> dict[str, float]:
            h, t = response_kl(model, aligned, harm), response_kl(model, finetuned, task)
            return {"harm_kl": h, "task_kl": t, "score": h + t}

        path = ctx.work_dir / "selection.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        resumed = bool(done)
        if "finetuned" not in done:
            done["finetuned"] = score()  # U(θ*): where the patch starts
        from tqdm.auto import tqdm

        for i in tqdm(usable, desc="one-shot selection", unit="candidate"):
            if str(i) in done:
                continue
            model.load_state_dict(finetuned.state_dict())
            patch(model, tokenize([pool[i]]), cfg, tok, ctx.work_dir / "trainer", ctx.run.seed)
            done[str(i)] = score()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(done))
            os.replace(tmp, path)
        best = min(usable, key=lambda i: (done[str(i)]["score"], i))
        model.load_state_dict(finetuned.state_dict())
        candidates = [{"index": i, **done[str(i)]} for i in usable]
        return pool[best], {
            "pool_index": best,
            "pool_size": len(pool),
            "skipped": sorted(cut),
            "n_harmful": len(harmful),
            "n_task": min(cfg.n_task, len(ctx.plan.task_validation)),
            "finetuned_objective": done["finetuned"],
            "selected_objective": done[str(best)],
            "candidates": candidates,
            "resumed": resumed,
        }
