"""TrainingArguments from ftguard's typed recipe (``TrainConfig``): shared by the pipeline's stages and by the post
methods that train (a safety adapter, a one-example patch), so every Trainer of a run is configured alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from ftguard.config import TrainConfig
from ftguard.models import auto_uses_bf16


def mixed_precision_flags(choice: str) -> dict[str, bool]:
    cuda = torch.cuda.is_available()
    if choice == "auto":
        choice = "bf16" if auto_uses_bf16() else "no"
    if choice == "fp16" and not cuda:
        raise ValueError("fp16 mixed precision needs a GPU; use bf16 or no on CPU")
    # On CPU, bf16 autocast runs through accelerate's CPU path, which transformers enables via use_cpu.
    return {"bf16": choice == "bf16", "fp16": choice == "fp16", "use_cpu": not cuda}


def training_arguments(train: TrainConfig, out: Path, seed: int, **overrides: Any) -> TrainingArguments:
    """The recipe as TrainingArguments, checkpoints in ``out``; ``overrides`` are TrainingArguments fields a caller
    sets differently (e.g. no checkpoints for a seconds-long patch)."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(out),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=train.weight_decay,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        activation_checkpointing=train.gradient_checkpointing,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        seed=seed,
        data_seed=seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **mixed_precision_flags(train.mixed_precision),
    )
    return TrainingArguments(**{**kwargs, **overrides})
