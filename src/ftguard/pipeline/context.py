"""What a method sees of the stage it trains in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from ftguard.config import RunConfig
from ftguard.data.example import Example
from ftguard.pipeline.plan import DataPlan


@dataclass
class StageContext:
    run: RunConfig
    stage: str  # "align" or "finetune"
    key: str  # output name, e.g. "finetune-p0.1"
    model: Any  # a PreTrainedModel or PeftModel, trainable parameters set by the adapter topology
    tokenizer: Any
    train_dataset: Dataset
    plan: DataPlan
    tokenize: Callable[[list[Example]], Dataset]
    out_dir: Path
    harmful_ratio: float | None = None
