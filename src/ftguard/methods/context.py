"""What a method sees: the stage it trains in (StageContext), the models it repairs (PostContext, ModelRef)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftguard.config import RunConfig
from ftguard.data.example import Example
from ftguard.data.plan import DataPlan

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class ModelRef:
    """Where a stage's result lives: a full model dir, plus base + adapter for the single-LoRA topology."""

    model_dir: str
    base_dir: str | None = None
    adapter_dir: str | None = None

    @classmethod
    def from_manifest(cls, stage_path: Path, manifest: dict[str, Any]) -> ModelRef:
        def resolve(p: str | None) -> str | None:
            return None if p is None else str((stage_path / p).resolve()) if not Path(p).is_absolute() else p

        return cls(
            model_dir=resolve(manifest["model_dir"]),
            base_dir=manifest.get("base_dir"),
            adapter_dir=resolve(manifest.get("adapter_dir")),
        )


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


@dataclass
class PostContext:
    """What a post-stage method sees: every model of the run as a folder, and the data.

    ``base`` is the model before alignment, ``aligned`` the output of the align stage (A), ``finetuned`` the
    user's fine-tune (F: a merged model folder, plus the adapter and the folder it was trained on for LoRA
    topologies). ``work_dir`` survives an interruption (resumable state); it is removed once the stage completes.
    """

    run: RunConfig
    key: str  # output name, e.g. "post-p0.1"
    base: ModelRef
    aligned: ModelRef
    finetuned: ModelRef
    tokenizer: Any
    plan: DataPlan
    work_dir: Path
    harmful_ratio: float | None = None

    def load(self, ref: Any, **kwargs: Any) -> Any:
        """A model folder as a transformers model, with the run's dtype and remote-code setting."""
        from ftguard.models import load_model

        mc = self.run.model
        return load_model(
            ref.model_dir, **{"dtype": mc.dtype, "trust_remote_code": mc.trust_remote_code, **kwargs}
        )
