"""Moderation filter: a judge screens the user's upload and the flagged samples are dropped before training.

The guardrail baseline that attacks such as Virus try to evade. It is a data step, so it wraps any other
fine-tuning-stage method (``then``, default SFT) and hands it the filtered data: ``filter`` + ``lisa`` is
``{method: filter, args: {judge: ftguard-judge, then: lisa, then_args: {rho: 1}}}``.

The judge sees each sample as the model would be asked it (instruction and input) and the upload's answer.
Degenerate answers (empty, one word, repetition) are never flagged by any judge, so one-word task labels
(SST2's "positive") always pass. The stage manifest reports how many harmful and benign samples were removed,
using the data plan's attack pool as ground truth for which samples were harmful.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ftguard import distributed
from ftguard.cost import ExtraCost
from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.registry import get_method, register_method
from ftguard.schema import check

if TYPE_CHECKING:
    from datasets import Dataset

    from ftguard.config import RunConfig
    from ftguard.data.example import Example
    from ftguard.data.plan import DataPlan
    from ftguard.evaluation.judges import Judge
    from ftguard.methods.context import StageContext


@dataclass
class FilterConfig:
    judge: str = field(
        default="ftguard-judge",
        metadata={
            "help": "the moderation judge (ftguard-judge: offline, prompt + answer; beaver-dam, llama-guard, "
            "llama-guard-1b, qwen3guard, duoguard, minilm, keyword)"
        },
    )
    judge_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "options of the judge (e.g. model path, threshold)"}
    )
    then: str = field(
        default="sft", metadata={"help": "the fine-tuning-stage method trained on the filtered data"}
    )
    then_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "arguments of the `then` method"}
    )

    def __post_init__(self) -> None:
        check(self.then != "filter", "then", "cannot be filter itself")


# Judging an upload twice (the dry run while preparing, then the stage) would double a 7B judge's cost.
_VERDICT_CACHE: dict[str, list[bool]] = {}


def _cache_key(judge: Judge, examples: list[Example]) -> str:
    blob = json.dumps(
        [judge.describe(), [(e.instruction, e.input, e.output) for e in examples]],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _as_asked(example: Example) -> str:
    return f"{example.instruction}\n{example.input}".strip()


@register_method
class ModerationFilter(Method):
    name = "filter"
    stages = ("finetune",)
    paper = "moderation-filter guardrail baseline (e.g. as evaded by Virus, Huang et al. 2025)"
    summary = (
        "a judge drops flagged samples of the upload, then another fine-tuning method (default SFT) trains"
    )
    config_class = FilterConfig

    def __init__(self, config: FilterConfig, inner: Method | None = None) -> None:
        super().__init__(config)
        self.inner = (
            inner if inner is not None else get_method(config.then, "finetune").from_args(config.then_args)
        )
        self.unsupported_modes = self.inner.unsupported_modes  # the `then` method does the training
        self._judge: Judge | None = None

    @classmethod
    def from_args(cls, args: dict[str, Any] | None, prefix: str = "args") -> ModerationFilter:
        cfg = cls.parse_args(args, prefix=prefix)
        try:
            inner_cls = get_method(cfg.then, "finetune")
        except FtguardError as exc:
            raise FtguardError(f"{prefix}.then: {exc}") from None
        return cls(cfg, inner_cls.from_args(cfg.then_args, prefix=f"{prefix}.then_args"))

    def check_run_config(self, run: RunConfig, stage: str) -> None:
        self.inner.check_run_config(run, stage)

    @property
    def pass_factor(self) -> float:  # type: ignore[override]
        return self.inner.pass_factor

    def extra_cost(self, run: RunConfig, stage: str) -> ExtraCost:
        # The judge reads every sample of the upload once, then the inner method trains.
        inner = self.inner.extra_cost(run, stage)
        read = (self.config.judge, self.config.judge_options, run.data.finetune.n)
        return dataclasses.replace(inner, judge_reads=[read, *inner.judge_reads])

    def judges(self) -> dict[str, tuple[str, dict[str, Any]]]:
        return {"judge": (self.config.judge, self.config.judge_options)}

    def wrapped(self) -> dict[str, Method]:
        return {"then_args": self.inner}

    @property
    def required_roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.inner.required_roles

    @property
    def judge(self) -> Judge:
        if self._judge is None:
            from ftguard.evaluation.judges import get_judge

            self._judge = get_judge(self.config.judge, **self.config.judge_options)
        return self._judge

    def prepare_data(self, plan: DataPlan, run: RunConfig, stage: str) -> None:
        self.inner.prepare_data(plan, run, stage)

    def load_resources(self) -> None:
        self.inner.load_resources()
        self.judge  # noqa: B018  (load it now: an unavailable judge must fail before any training)

    def flags(self, examples: list[Example]) -> list[bool]:
        key = _cache_key(self.judge, examples)
        if key not in _VERDICT_CACHE:
            # Under a launch each rank judges every n-th sample and the verdicts are gathered back in order:
            # a 7B judge on each of 8 GPUs would otherwise judge the whole upload 8 times over.
            n, r = distributed.world_size(), distributed.rank()
            share = examples[r::n]
            verdicts = list(self.judge.judge([_as_asked(e) for e in share], [e.output for e in share]))
            merged: list[bool] = [False] * len(examples)
            for i, part in enumerate(distributed.gather(verdicts)):
                merged[i::n] = part
            _VERDICT_CACHE[key] = merged
        return _VERDICT_CACHE[key]

    def train_examples(self, examples: list[Example], plan: DataPlan) -> tuple[list[Example], dict[str, Any]]:
        flags = self.flags(examples)
        harmful_keys = {e.prompt_key for e in plan.attack_pool}
        is_harmful = [e.prompt_key in harmful_keys for e in examples]
        kept = [e for e, flagged in zip(examples, flags, strict=True) if not flagged]
        if not kept:
            raise FtguardError(
                f"the {self.config.judge} filter flagged all {len(examples)} uploaded samples: nothing left to train on"
            )
        removed = [h for h, flagged in zip(is_harmful, flags, strict=True) if flagged]
        counts: dict[str, Any] = {
            "judge": self.judge.describe(),
            "uploaded": len(examples),
            "removed": len(removed),
            "kept": len(kept),
        }
        if any(mix.get("upload") for mix in plan.mix_reports.values()):
            # A customer's rows carry no harmful/benign label: which rows went is what the provider can check.
            counts["removed_rows"] = [e.source for e, flagged in zip(examples, flags, strict=True) if flagged]
        else:
            counts |= {
                "uploaded_harmful": sum(is_harmful),
                "removed_harmful": sum(removed),
                "removed_benign": len(removed) - sum(removed),
                "kept_harmful": sum(is_harmful) - sum(removed),
            }
        report = {"filter": counts}
        kept, inner_report = self.inner.train_examples(kept, plan)
        return kept, {**report, **inner_report}

    def extra_datasets(self, ctx: StageContext) -> dict[str, Dataset]:
        return self.inner.extra_datasets(ctx)

    def create_trainer(self, ctx: StageContext, **trainer_kwargs: Any):
        return self.inner.create_trainer(ctx, **trainer_kwargs)
