"""Batch padding for causal-LM training (usable as ``Trainer(data_collator=...)``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftguard.data.template import IGNORE_INDEX
from ftguard.errors import FtguardError

if TYPE_CHECKING:
    import torch


@dataclass
class CausalLMCollator:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100).

    Other keys in the features are ignored, so datasets may carry bookkeeping columns.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pad_to_multiple_of: int | None = None) -> CausalLMCollator:
        # Padded positions are masked out of attention and loss, so EOS is a safe stand-in pad id.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise FtguardError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
        return cls(pad_token_id=int(pad), pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CausalLMCollator got an empty batch")
        ids = [_as_list(f["input_ids"]) for f in features]
        masks = [
            _as_list(f["attention_mask"]) if "attention_mask" in f else [1] * len(i)
            for f, i in zip(features, ids, strict=True)
        ]
        labels = [_as_list(f["labels"]) if "labels" in f else None for f in features]
        width = max(len(i) for i in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = -(-width // m) * m
        batch = {
            "input_ids": _pad(ids, width, self.pad_token_id),
            "attention_mask": _pad(masks, width, 0),
        }
        if any(lab is not None for lab in labels):
            if any(lab is None for lab in labels):
                raise ValueError("some features in the batch have 'labels' and some do not")
            batch["labels"] = _pad(labels, width, IGNORE_INDEX)
        return batch


def _as_list(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    import torch  # deferred so that `import ftguard.data` stays light

    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)
