"""What the sweep tests share: a tiny sweep, the unit folders it makes, and finished runs written by hand."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ftguard.config import load_config
from ftguard.resolve import resolve_run
from ftguard.schema import from_dict
from ftguard.sweep.config import SweepConfig, SweepRun

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


def fake_runs(tmp_path, sweep, values):
    """values: {(defense, p, seed, lr): (hs, fa)} → SweepRuns with results.json files as the pipeline writes."""
    runs = []
    base = load_config("quickstart-tiny")
    for (defense, p, seed, lr), (hs, fa) in values.items():
        out = tmp_path / f"{defense}-{p}-{seed}-{lr}"
        out.mkdir()
        entry = {
            "stage": "finetune",
            "method": "sft",
            "harmful_ratio": p,
            "harmful_score": hs,
            "harmful_score_plus": hs,
            "finetune_accuracy": fa,
            "over_refusal": 0.0,
            "judge": "keyword",
        }
        if float(hs).is_integer() and float(fa).is_integer():  # rates of 100 prompts: the counts behind them
            entry["counts"] = {"harmful_score": [int(hs), 100], "finetune_accuracy": [int(fa), 100]}
        stages = {"align": {"stage": "align", "harmful_score": 0.0, "judge": "keyword"}, "finetune": entry}
        (out / "results.json").write_text(json.dumps({"complete": True, "stages": stages}))
        cfg = dataclasses.replace(base, output_dir=str(out), seed=seed)
        attack = {"finetune.train.learning_rate": lr} if lr is not None else {}
        runs.append(
            SweepRun(out.name, defense, seed, {"data.finetune.harmful_ratio": p}, attack, resolve_run(cfg))
        )
    return runs
