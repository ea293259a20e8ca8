"""Supervised fine-tuning: the baseline of both stages (docs/methods.md, SFT)."""

from __future__ import annotations

from ftguard.methods.base import Method
from ftguard.methods.registry import register_method


@register_method
class SFT(Method):
    """One forward and one backward pass per step on the stage's batch, then an AdamW step.

    In the align stage it trains on the safety data; in the finetune stage on the user's mix.
    """

    name = "sft"
    stages = ("align", "finetune")
    paper = "baseline (docs/methods.md, SFT)"
    summary = "plain supervised fine-tuning, response-only loss"
