"""The model at the start of a training stage, as a frozen function, without a second model in memory.

Methods that regularise toward where the stage started (LDIFS's feature distance, KL to a teacher;
docs/methods.md, LDIFS and KL) need that model's outputs on every batch. The originals kept a deep copy of the
whole model (LDIFS) or reloaded its state dict twice per step (KL; docs/methods.md, Original-code bugs #4).
``ReferenceModel`` captures the start once, when the
trainer is created (before a resumed run loads its checkpoint, so a resume sees the same start), in one of two
ways, both exact:

* ``disable_adapter``: a PEFT model whose trainable parameters are exactly its LoRA A/B matrices and whose every
  lora_B is exactly zero (the double topology's fresh adapter). Such an adapter adds exactly 0, so the
  start-of-stage model is the same model with its adapters disabled: no copy at all.
* ``snapshot``: anything else (single topology = the continued alignment LoRA; full topology; extra trainable
  modules). A copy of the trainable parameters only, swapped in with ``torch.func.functional_call``. With LoRA
  that is LoRA-sized; with full fine-tuning it is one copy of every weight, as much memory as the originals'
  second model.

The reference runs under ``no_grad`` and in eval mode (no dropout: a deterministic target; the original LDIFS
copy was in eval mode too, and the original KL teacher's only dropout sat on a zero LoRA). It calls the module
inside a DDP wrapper directly, so no gradient synchronisation is involved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from ftguard.errors import FtguardError
from ftguard.training.trainer import FtguardTrainer

LORA_FACTORS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")
LORA_ZERO_FACTORS = (".lora_B.", ".lora_embedding_B.")


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel-like wrappers (a PEFT model stays a PEFT model)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _is_fresh_lora(module: nn.Module, trainable: dict[str, nn.Parameter]) -> bool:
    """True if disabling the adapters gives exactly the current outputs: see the module docstring."""
    if not callable(getattr(module, "disable_adapter", None)) or not hasattr(module, "peft_config"):
        return False
    if not all(any(f in name for f in LORA_FACTORS) for name in trainable):
        return False
    for name, param in module.named_parameters():
        if "lora_magnitude_vector" in name:  # DoRA rescales the base weight even when lora_B is zero
            return False
        if any(f in name for f in LORA_FACTORS) and not param.requires_grad:
            # PEFT re-enables adapters by making the active adapter's tensors trainable again: a frozen LoRA
            # tensor would silently become trainable.
            return False
        if any(f in name for f in LORA_ZERO_FACTORS) and torch.count_nonzero(param).item() != 0:
            return False
    return True


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modules = list(module.modules())
    flags = [m.training for m in modules]
    module.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag


class ReferenceModel:
    """Outputs of ``model`` as it was when this object was created: ``reference(**inputs)`` runs one forward.

    Forward hooks registered on the model's sub-modules fire during the reference forward too (it runs the same
    modules), which is how a caller reads the reference's intermediate activations.
    """

    def __init__(self, model: nn.Module) -> None:
        self.module = unwrap_parallel(model)
        trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        if not trainable:
            raise FtguardError(
                "the model has no trainable parameters: nothing would move away from the reference"
            )
        self.mode: Literal["disable_adapter", "snapshot"]
        if _is_fresh_lora(self.module, trainable):
            self.mode, self.snapshot = "disable_adapter", {}
        else:
            self.mode = "snapshot"
            self.snapshot = {n: p.detach().clone() for n, p in trainable.items()}
        self._probe = next(
            iter(trainable.values())
        )  # where the trained weights live now (moved by a launcher?)

    @property
    def snapshot_bytes(self) -> int:
        """Memory held for the reference: 0 with ``disable_adapter``."""
        return sum(t.numel() * t.element_size() for t in self.snapshot.values())

    def _weights(self) -> dict[str, torch.Tensor]:
        first = next(iter(self.snapshot.values()))
        if first.device != self._probe.device:  # the model was moved after the capture
            self.snapshot = {n: t.to(self._probe.device) for n, t in self.snapshot.items()}
        return self.snapshot

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), _eval_mode(self.module):
            if self.mode == "disable_adapter":
                with self.module.disable_adapter():
                    return self.module(*args, **kwargs)
            return functional_call(self.module, self._weights(), args, kwargs)


# For the Method classes whose trainer is a ReferenceTrainer (their ``unsupported_modes``).
REFERENCE_UNSUPPORTED_MODES = {
    mode: "its reference runs the unwrapped model (adapter off, or the start weights swapped in) outside the "
    f"{label} wrapper, which gathers the sharded weights only for its own forward"
    for mode, label in (("fsdp", "FSDP"), ("deepspeed_zero3", "ZeRO-3"))
}


class ReferenceTrainer(FtguardTrainer):
    """An FtguardTrainer that captures ``self.reference`` (the model at the start of the stage) when created.

    Subclasses add a term against the reference in ``compute_loss``; ``scale_extra`` makes a per-micro-batch
    term accumulate like the Trainer's own loss, so gradient accumulation averages it over micro-batches.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference = ReferenceModel(self.model)

    @staticmethod
    def reference_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
        """The student's model inputs without the labels (the reference's loss is never needed)."""
        return {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}

    @staticmethod
    def positions(inputs: dict[str, Any], include_padding: bool) -> torch.Tensor:
        """[B, T] bool: the positions a reference term counts (real tokens, or every position as the originals)."""
        mask = inputs.get("attention_mask")
        if include_padding or mask is None:
            return torch.ones_like(inputs["input_ids"], dtype=torch.bool)
        return mask.bool()
