"""SafeMERGE: merge a safety LoRA into the user's LoRA in the layers that stray from the alignment subspace (post).

Djuhera, Kadhe, Ahmed, Zawad, Boche, "SafeMERGE: Preserving Safety Alignment in Fine-Tuned Large Language Models
via Selective Layer-Wise Model Merging", 2025 (arXiv 2503.17239); authors' code aladinD/SafeMERGE (``utils.py``:
``SafeLoRAMerger``; ``get_safemerge_model.py``). Double topology only, as in the paper: the user's LoRA is trained
on the aligned model, and the safety LoRA is merged with it factor by factor.

1. Safety LoRA: a LoRA with the user's configuration (``adapter.finetune``: the merge needs the same rank) is trained
   by SFT on the aligned model, on the first ``n_safety`` alignment refusals (``data.alignment``), with the user's
   fine-tuning recipe (``finetune.train``, keys overridden by ``safety_train``), through FtguardTrainer; kept in
   the post stage's work folder, so an interrupted repair resumes.
2. For every module i of the user's LoRA: V_i = W_A,i − W_base,i, C_i = V_i V_iᵀ/‖V_i‖_F, ΔW_i = s_f·B_f A_f and
   ρ_i = cos(vec(C_i ΔW_i), vec(ΔW_i)): SafeLoRA's measure, imported from ``safelora.py``.
3. Where ρ_i < ``threshold``: PEFT's factor-wise merge, which the authors call per layer. ``linear``:
   A = √(w_f s_f)·A_f + √(w_s s_s)·A_s, B likewise, and the layer becomes W_A,i + B·A (the merged adapter's scaling
   is 1); ``dare_linear``: each of the four factors first loses entries with probability 1 − density and is
   rescaled by 1/density. Every other weight is F's, bit for bit.

The factor-wise ``linear`` merge is not the weighted sum of the two updates: B·A = w_f ΔW_f + w_s ΔW_s +
√(w_f w_s s_f s_s)(B_f A_s + B_s A_f). It is what the authors' code computes.

The safety LoRA. The paper trains one per model on a public set of harmful prompts with safe answers (100 to 2,500
samples in its ablation); the repository ships merged adapters built from safety models of 100 and 500 samples
and no recipe for training one. Here it is trained on the run's alignment refusals (disjoint from the attack and
evaluation prompts) with the user's recipe. The double topology's alignment LoRA is not used instead: it was
trained on the base model, not the aligned one, its update is V itself, and its rank need not be the user's.

Differences from the authors' code, each not copied:

* Layers are matched by module name. The authors collect the C matrices walking the base and aligned models'
  ``named_parameters()`` in step (a target name as a substring; biases skipped only when "Qwen" is in the model
  path) and hand them out by a running counter over the LoRA layers.
* ρ is compared unrounded, in float32; the authors round it to 5 decimals before ``cos < threshold``.
* The authors merge every unselected layer with weights [1, 0], so ``dare_linear`` also drops and rescales entries
  of the user's own factors there; here unselected layers keep F's weights exactly.
* Their script passes any PEFT combination type (ties, magnitude_prune, cat, ...), and all but ``linear`` and
  ``dare_linear`` leave the merged adapter zero in every layer, deleting the fine-tune; so does a layer the safety
  adapter lacks. Here the config accepts those two only, and both adapters must adapt the same modules.
* A module whose alignment matrix is zero gets C = 0 in theirs, so ρ = 0 and a merge; here it is refused, as in
  SafeLoRA (there is no subspace to measure against).
* The output is the merged full model (a post stage's output), not a rank-r adapter: the same weights.
* DARE's random drops are seeded by the run's seed.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ftguard.config import RunConfig, TrainConfig
from ftguard.cost import GpuSpec, alignment_n, cost_result, train_seconds
from ftguard.errors import FtguardError
from ftguard.methods.base import PostMethod
from ftguard.methods.context import PostContext
from ftguard.methods.registry import register_method
from ftguard.methods.safelora import adapter_deltas, alignment_matrices, update_similarity
from ftguard.schema import check, from_dict, to_dict

log = logging.getLogger(__name__)

SAFETY = "safety"  # adapter name of the safety LoRA beside the user's


@dataclass
class SafeMergeConfig:
    """Defaults: aladinD/SafeMERGE ``get_safemerge_model.py`` (--cos_threshold, --weighting, --merge_type) and README
    (density), unless said otherwise."""

    threshold: float = field(default=0.35, metadata={"help": "merge where ρ < threshold, in [-1, 1] (0.35)"})
    finetuned_weight: float = field(default=0.8, metadata={"help": "w_f, the user's LoRA's weight ≥ 0 (0.8)"})
    safety_weight: float = field(default=0.2, metadata={"help": "w_s, the safety LoRA's weight ≥ 0 (0.2)"})
    combination_type: Literal["linear", "dare_linear"] = field(
        default="linear", metadata={"help": "PEFT's factor-wise merge, the two the authors support (linear)"}
    )
    density: float = field(
        default=0.5, metadata={"help": "dare_linear: share of factor entries kept, in (0, 1] (README: 0.5)"}
    )
    projection: Literal["approx", "exact"] = field(
        default="approx",
        metadata={"help": "approx: C = VVᵀ/‖V‖_F (the authors'); exact: the projector onto V's columns"},
    )
    n_safety: int = field(
        default=500,  # the larger of the authors' shipped safety models (SafetyModel_500)
        metadata={"help": "alignment refusals the safety LoRA trains on (fewer, with a warning, if absent)"},
    )
    safety_train: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "finetune.train keys changed for the safety LoRA; {} = the user's recipe"},
    )

    def __post_init__(self) -> None:
        check(
            -1 <= self.threshold <= 1, "threshold", f"is a cosine, must be in [-1, 1], got {self.threshold}"
        )
        for key in ("finetuned_weight", "safety_weight"):
            value = getattr(self, key)
            # PEFT scales each factor by √(weight·scaling): a negative weight has no square root.
            check(value >= 0, key, f"must be ≥ 0 (each factor is scaled by its square root), got {value}")
        check(0 < self.density <= 1, "density", f"must be in (0, 1], got {self.density}")
        check(self.n_safety >= 1, "n_safety", f"must be ≥ 1, got {self.n_safety}")
        # Key names and types, before any work (the values are checked again over the user's recipe).
        from_dict(TrainConfig, self.safety_train, prefix="safety_train")


def safety_recipe(run: RunConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The user's fine-tuning recipe with ``overrides``: how the safety LoRA is trained."""
    base = to_dict(run.finetune.train) if run.finetune is not None else {}
    return from_dict(TrainConfig, {**base, **overrides}, prefix="post.args.safety_train")


def train_safety_adapter(ctx: PostContext, cfg: SafeMergeConfig) -> tuple[Path, dict[str, Any]]:
    """Step 1: the safety LoRA's folder and a summary of its training; reused when a previous attempt saved it."""
    from transformers import set_seed

    from ftguard.data.collate import CausalLMCollator
    from ftguard.data.template import tokenize_dataset
    from ftguard.models import add_lora
    from ftguard.training.arguments import training_arguments
    from ftguard.training.trainer import FtguardTrainer, resumable_checkpoint

    done = ctx.work_dir / "safety_adapter"
    if (done / "summary.json").is_file():
        return done, {**json.loads((done / "summary.json").read_text()), "resumed": True}
    run, mc = ctx.run, ctx.run.model
    examples = ctx.plan.alignment[: cfg.n_safety]
    if len(examples) < cfg.n_safety:
        log.warning(
            "safemerge: %d alignment refusals for the safety LoRA, %d asked", len(examples), cfg.n_safety
        )
    dataset, stats = tokenize_dataset(
        examples,
        ctx.tokenizer,
        max_length=mc.max_length,
        style=mc.template,
        response_newline=mc.response_newline,
    )
    recipe = safety_recipe(run, cfg.safety_train)
    checkpoints = ctx.work_dir / "safety_checkpoints"
    set_seed(run.seed)  # the LoRA's initialisation
    model = add_lora(ctx.load(ctx.aligned), run.adapter.finetune)
    trainer = FtguardTrainer(
        model=model,
        args=training_arguments(recipe, checkpoints, run.seed),
        train_dataset=dataset,
        data_collator=CausalLMCollator.from_tokenizer(ctx.tokenizer),
        processing_class=ctx.tokenizer,
    )
    resume = resumable_checkpoint(checkpoints)
    result = trainer.train(resume_from_checkpoint=resume)
    summary = {
        "examples": stats["n"],
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "recipe": to_dict(recipe),
        "resumed_from": Path(resume).name if resume else None,
    }
    staging = ctx.work_dir / "safety_adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(staging)
    (staging / "summary.json").write_text(json.dumps(summary))
    os.replace(staging, done)  # the adapter is there whole, or not at all
    shutil.rmtree(checkpoints, ignore_errors=True)
    del trainer, model
    gc.collect()
    return done, {**summary, "resumed": False}


Factors = tuple[torch.Tensor, torch.Tensor, float]  # A [r, in], B [out, r], scaling


def lora_factors(module: nn.Module, adapter: str, name: str) -> Factors:
    """float32 CPU copies of one adapter's A and B in a LoRA layer, and its scaling."""
    if adapter not in module.lora_A:
        raise FtguardError(
            f"the {adapter} LoRA does not adapt '{name}': both LoRAs must adapt the same modules"
        )
    return (
        module.lora_A[adapter].weight.detach().to("cpu", torch.float32, copy=True),
        module.lora_B[adapter].weight.detach().to("cpu", torch.float32, copy=True),
        float(module.scaling[adapter]),
    )


def merged_factors(
    finetuned: Factors, safety: Factors, cfg: SafeMergeConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: (A, B) of the merged adapter (scaling 1), as PEFT's ``_generalized_task_arithmetic_weighted_adapter``
    merges one layer; DARE draws from torch's global generator."""
    from peft.utils.merge_utils import dare_linear, task_arithmetic

    (a_f, b_f, s_f), (a_s, b_s, s_s) = finetuned, safety
    weights = torch.tensor([math.sqrt(cfg.finetuned_weight * s_f), math.sqrt(cfg.safety_weight * s_s)])
    if cfg.combination_type == "linear":
        return task_arithmetic([a_f, a_s], weights), task_arithmetic([b_f, b_s], weights)
    return dare_linear([a_f, a_s], weights, cfg.density), dare_linear([b_f, b_s], weights, cfg.density)


@register_method
class SafeMerge(PostMethod):
    """Merge a safety LoRA (trained here on the alignment refusals) into the user's LoRA where ρ < threshold."""

    name = "safemerge"
    paper = "Djuhera et al., SafeMERGE: Preserving Safety Alignment in Fine-Tuned LLMs via Selective Layer-Wise Model Merging, 2025"
    summary = (
        "merges a safety LoRA into the fine-tune LoRA in the layers whose update strays from the aligned−base "
        "subspace"
    )
    config_class = SafeMergeConfig
    required_roles = ("alignment",)

    def check_run_config(self, run: RunConfig, stage: str) -> None:
        check(
            run.align is not None,
            "post.method",
            "safemerge needs the align stage: its subspace is aligned − base weights (set align.method, e.g. sft)",
        )
        check(
            run.adapter.topology == "double",
            "adapter.topology",
            f"safemerge merges the user's LoRA with a safety LoRA trained on the aligned model, so it needs the "
            f"double topology, got {run.adapter.topology}",
        )
        check(run.finetune is not None, "finetune", "is null: safemerge repairs the user's fine-tuned LoRA")
        safety_recipe(run, self.config.safety_train)

    def cost(self, run: RunConfig, n_params: float, gpu: GpuSpec) -> dict[str, Any]:
        # The safety LoRA's SFT (LoRA: 4N per token); the projections and merges are seconds, as in SafeLoRA.
        recipe = safety_recipe(run, self.config.safety_train)
        n_align, note = alignment_n(run)
        n = min(self.config.n_safety, n_align)
        if recipe.max_steps > 0:
            micro_batches = recipe.max_steps * recipe.grad_accum
        else:
            micro_batches = math.ceil(recipe.epochs * math.ceil(n / recipe.batch_size))
        tokens = micro_batches * recipe.batch_size * run.model.max_length
        flops = tokens * 4.0 * n_params
        notes = [
            f"{run.model.name} N={n_params:.3g}",
            note,
            f"safemerge: safety LoRA SFT, {micro_batches} micro-batches of {recipe.batch_size} × "
            f"{run.model.max_length} tokens on {n} refusals, LoRA 4N per token",
        ]
        return cost_result(train_seconds(flops, gpu.peak_tflops, gpu), tokens, flops, notes)

    def repair(self, ctx: PostContext) -> tuple[Any, dict[str, Any]]:
        from ftguard.models import load_lora

        cfg = self.config
        if not ctx.finetuned.adapter_dir:
            raise FtguardError(
                f"{ctx.key}: the fine-tuned model has no adapter folder: re-run the finetune stage"
            )
        safety_dir, safety_report = train_safety_adapter(ctx, cfg)

        # ΔW_f on the model both LoRAs were trained on; then the two adapters' factors, layer by layer.
        peft_model = load_lora(ctx.load(ctx.aligned), ctx.finetuned.adapter_dir, trainable=False)
        user = peft_model.active_adapter
        w_aligned, deltas = adapter_deltas(peft_model)
        peft_model.load_adapter(str(safety_dir), adapter_name=SAFETY)
        factors = {}
        for name, module in peft_model.get_base_model().named_modules():
            if name in deltas:
                factors[name] = (lora_factors(module, user, name), lora_factors(module, SAFETY, name))
                if factors[name][0][0].shape != factors[name][1][0].shape:
                    raise FtguardError(f"'{name}': the user's and the safety LoRA have different ranks")
        del peft_model
        gc.collect()
        v = alignment_matrices(
            ctx,
            w_aligned,
            hint="make adapter.finetune.target_modules a subset of adapter.align.target_modules",
        )

        model = ctx.load(ctx.finetuned)
        modules = dict(model.named_modules())
        names = [n for n in modules if n in deltas]  # the model's layer order
        device = modules[names[0]].weight.device
        rows = []
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.run.seed)  # DARE's drops
            for n in names:
                _, rho = update_similarity(deltas[n].to(device), v[n].to(device), cfg.projection)
                merge = rho < cfg.threshold
                if merge:
                    a, b = merged_factors(*factors[n], cfg)
                    weight = modules[n].weight
                    weight.copy_((w_aligned[n] + b @ a).to(device, weight.dtype))
                rows.append({"module": n, "similarity": round(rho, 6), "merged": merge})
        merged = sum(r["merged"] for r in rows)
        report = {
            "threshold": cfg.threshold,
            "combination_type": cfg.combination_type,
            "weights": [cfg.finetuned_weight, cfg.safety_weight],
            "density": cfg.density if cfg.combination_type == "dare_linear" else None,
            "projection": cfg.projection,
            "layers": len(rows),
            "merged": merged,
            "safety_adapter": safety_report,
            "per_layer": rows,
            "resumed": safety_report["resumed"],
        }
        log.info("%s: safemerge merged %d of %d layers with the safety LoRA", ctx.key, merged, len(rows))
        return model, report
