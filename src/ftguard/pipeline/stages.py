"""One training stage (align or finetune): model by topology → method's Trainer → safe, resumable output.

Output of a stage directory:
  model/        the merged full model + tokenizer (safetensors): what evaluation and the next stage load
  adapter/      the trained LoRA alone (LoRA topologies)
  train_log.json, COMPLETE.json (manifest, written last)
  checkpoints/  Trainer checkpoints while training; removed once the stage is complete
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from ftguard import distributed
from ftguard.config import LoraConfig, RunConfig
from ftguard.data.collate import CausalLMCollator
from ftguard.data.example import Example
from ftguard.data.plan import DataPlan
from ftguard.data.template import tokenize_dataset
from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.context import ModelRef, StageContext
from ftguard.models import (
    add_lora,
    hardware_label,
    load_lora,
    load_model,
    load_tokenizer,
    merge_lora,
    precision_label,
)
from ftguard.models.adapters import check_target_modules, count_parameters
from ftguard.pipeline.outputs import StageDir
from ftguard.schema import to_dict
from ftguard.training.arguments import training_arguments
from ftguard.training.trainer import resumable_checkpoint

log = logging.getLogger(__name__)


def _lora_for(run: RunConfig, stage: str) -> LoraConfig:
    return run.adapter.align if stage == "align" else run.adapter.finetune


def build_trainable_model(run: RunConfig, stage: str, source: ModelRef) -> tuple[Any, str | None]:
    """Load the stage's starting model and make the right parameters trainable.

    Returns the model and the base model dir that a single-LoRA continuation needs later.
    """
    topology, mc = run.adapter.topology, run.model
    kwargs = {"dtype": mc.dtype, "trust_remote_code": mc.trust_remote_code, "revision": mc.revision}
    if topology == "single" and source.adapter_dir:
        # Booster's topology: keep training the alignment LoRA on top of the unmerged base
        # (docs/methods.md, Adapter topologies).
        model = load_model(source.base_dir, **kwargs)
        return load_lora(model, source.adapter_dir, trainable=True), source.base_dir
    model = load_model(source.model_dir, **kwargs)
    if run.adapter.trains_full(stage):
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    lora = run.adapter.align if topology == "single" and stage == "align" else _lora_for(run, stage)
    check_target_modules(model, lora)
    return add_lora(model, lora), source.model_dir


def train_stage(
    run: RunConfig,
    stage: str,
    key: str,
    examples: list[Example],
    plan: DataPlan,
    source: ModelRef,
    out: StageDir,
    harmful_ratio: float | None = None,
    *,
    method: Method,
) -> ModelRef:
    """Train ``method`` (the resolved run's instance for ``stage``) on ``examples`` from ``source`` into ``out``."""
    stage_cfg = getattr(run, stage)
    mc = run.model

    set_seed(run.seed)  # LoRA initialisation and dropout must be reproducible
    tokenizer = load_tokenizer(source.model_dir, trust_remote_code=mc.trust_remote_code)
    model, base_dir = build_trainable_model(run, stage, source)
    trainable, total = count_parameters(model)
    log.info(
        "%s: %s, %d of %d parameters trainable (%s topology)",
        key,
        stage_cfg.method,
        trainable,
        total,
        run.adapter.topology,
    )

    def tokenize(exs: list[Example]):
        dataset, _ = tokenize_dataset(
            exs, tokenizer, max_length=mc.max_length, style=mc.template, response_newline=mc.response_newline
        )
        return dataset

    examples, method_data = method.train_examples(examples, plan)
    if not examples:
        raise FtguardError(f"{key}: no training examples for {stage_cfg.method}")
    train_dataset, data_stats = tokenize_dataset(
        examples, tokenizer, max_length=mc.max_length, style=mc.template, response_newline=mc.response_newline
    )
    out.path.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out.path / "checkpoints"
    args = training_arguments(stage_cfg.train, ckpt_dir, run.seed)
    ctx = StageContext(
        run=run,
        stage=stage,
        key=key,
        model=model,
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        plan=plan,
        tokenize=tokenize,
        out_dir=out.path,
        harmful_ratio=harmful_ratio,
    )
    trainer = method.create_trainer(
        ctx,
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=CausalLMCollator.from_tokenizer(tokenizer),
        processing_class=tokenizer,
    )
    # The mode the Trainer's accelerator really set up (launcher, TrainingArguments), before any work.
    distributed.check_supported(method, stage, distributed.trainer_mode(trainer.accelerator))
    resume = resumable_checkpoint(ckpt_dir)
    if resume:
        log.info("%s: resuming from %s", key, resume)
    result = trainer.train(resume_from_checkpoint=resume)

    is_lora = not run.adapter.trains_full(stage)
    if distributed.world_size() > 1:
        if not _save_from_ranks(trainer, out, is_lora, base_dir, run):
            distributed.barrier()  # rank 0 has committed the unit
            return ModelRef.from_manifest(out.path, out.manifest())
        staging = out.staging
    else:
        staging = out.begin()
        if is_lora:
            trainer.model.save_pretrained(staging / "adapter")
        merged = merge_lora(trainer.model) if is_lora else trainer.model
        merged.save_pretrained(staging / "model")
        tokenizer.save_pretrained(staging / "model")
    from ftguard.pipeline.outputs import write_json_atomic

    write_json_atomic(staging / "train_log.json", trainer.state.log_history)
    manifest = out.commit(
        {
            "stage": stage,
            "key": key,
            "method": stage_cfg.method,
            "method_args": to_dict(method.config),
            "topology": run.adapter.topology,
            "model_dir": "model",
            "adapter_dir": "adapter" if is_lora else None,
            "base_dir": base_dir if run.adapter.topology == "single" else None,
            "harmful_ratio": harmful_ratio,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "data": data_stats,
            "method_data": method_data,
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "resumed_from": Path(resume).name if resume else None,
            "precision": precision_label(
                next(trainer.model.parameters()).dtype,
                torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None,
            ),
            "hardware": hardware_label(),
        }
    )
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    distributed.barrier()  # the other ranks read the manifest once it is in place
    return ModelRef.from_manifest(out.path, manifest)


def _save_from_ranks(
    trainer: Any, out: StageDir, is_lora: bool, base_dir: str | None, run: RunConfig
) -> bool:
    """Save a stage trained by several processes into ``out``'s staging folder; True on rank 0, which saved it.

    Every rank takes part in ``Trainer.save_model``, which gathers the trained weights where FSDP or ZeRO-3 shard
    them; rank 0 writes them (the adapter, or the full model) and merges the adapter into a fresh copy of the
    base model on the CPU, as PEFT cannot merge into sharded weights. The same path runs under DDP.
    """
    main = distributed.is_main()
    staging = out.begin() if main else out.staging
    target = staging / ("adapter" if is_lora else "model")
    trainer.save_model(str(target))
    if not main:
        return False
    (target / "training_args.bin").unlink(missing_ok=True)  # a pickle: the run's outputs hold none
    if is_lora:
        mc = run.model
        base = load_model(
            base_dir, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code, revision=mc.revision
        )
        merged = merge_lora(load_lora(base, target, trainable=False))
        merged.save_pretrained(staging / "model")
        trainer.processing_class.save_pretrained(staging / "model")
    return True
