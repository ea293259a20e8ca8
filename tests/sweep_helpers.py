"""What the sweep tests share: a tiny sweep and the unit folders it makes."""

from __future__ import annotations

from pathlib import Path

from ftguard.schema import from_dict
from ftguard.sweep.config import SweepConfig

TINY = {
    "base": "quickstart-tiny",
    "set": {
        "evaluate.points": ["finetune", "post"],
        "align.train.max_steps": 2,
        "finetune.train.max_steps": 2,
        "evaluate.harmful_prompts.n": 4,
        "evaluate.over_refusal_prompts.n": 4,
        "evaluate.task_n": 4,
    },
}


def unit_folders(out: Path, kind: str) -> list[str]:
    """Unit folders of a kind (not their hidden lock files)."""
    return sorted(p.name for p in (out / "units" / kind).iterdir() if not p.name.startswith("."))


def tiny_sweep(**extra) -> SweepConfig:
    return from_dict(SweepConfig, {"name": "t", **TINY, **extra})
