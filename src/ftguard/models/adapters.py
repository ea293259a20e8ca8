"""LoRA adapters via PEFT: add, load, merge, and a readable check of the target module names.

The functions accept any object with ``r``, ``alpha``, ``dropout`` and ``target_modules`` attributes
(the run config's LoRA section works as is), not only :class:`LoraSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ftguard.errors import FtguardError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


@dataclass
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise FtguardError(
                f"LoRA r must be an integer ≥ 1, got {self.r!r}: set r to the adapter rank, e.g. 8"
            )
        if not self.alpha > 0:
            raise FtguardError(
                f"LoRA alpha must be > 0, got {self.alpha!r}: set alpha (scaling = alpha / r), e.g. 16"
            )
        if not 0 <= self.dropout < 1:
            raise FtguardError(
                f"LoRA dropout must be in [0, 1), got {self.dropout!r}: set dropout, e.g. 0.05"
            )
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise FtguardError(
                f"LoRA target_modules must be a non-empty list of module names, got {self.target_modules!r}: "
                "e.g. [q_proj, v_proj]"
            )
        self.target_modules = list(self.target_modules)


def _adaptable_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D)


def check_target_modules(model: nn.Module, spec: Any) -> None:
    """Raise an FtguardError naming the targets the model lacks, before PEFT's harder-to-read error."""
    targets = list(spec.target_modules)
    if targets == ["all-linear"]:
        return
    names = [n for n, m in model.named_modules() if isinstance(m, _adaptable_types())]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise FtguardError(
            f"LoRA target_modules {missing} match no layer of {type(model).__name__}: "
            f"choose from its Linear layers {linear}"
        )


def add_lora(model: PreTrainedModel, spec: Any) -> PeftModel:
    """Wrap ``model`` with a fresh causal-LM LoRA adapter; only the adapter is trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise FtguardError("model already carries a LoRA adapter: merge_lora() it before adding another")
    check_target_modules(model, spec)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_lora(model: PreTrainedModel, adapter_dir: str | Path, *, trainable: bool) -> PeftModel:
    """Attach a saved adapter to ``model``; ``trainable`` decides whether its weights get gradients."""
    from peft import PeftModel

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise FtguardError(
            f"'{path}' is not a LoRA adapter folder (no adapter_config.json): give the adapter's save dir"
        )
    if not (path / "adapter_model.safetensors").is_file():
        raise FtguardError(
            f"adapter '{path}' has no adapter_model.safetensors: re-save it with save_pretrained()"
        )
    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


def merge_lora(model: nn.Module) -> PreTrainedModel:
    """Fold the adapter into the base weights and return the plain model (a plain model is returned as is)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
