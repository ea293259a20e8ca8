"""Antidote: one-shot removal of the weights that matter most on harmful data, after the user's fine-tune
(docs/methods.md, Antidote; Huang et al., "Antidote: Post-fine-tuning Safety Alignment for Large Language
Models against Harmful Fine-tuning", ICML 2025; code ``git-disl/Antidote``).

What the original does (``train.py`` with ``--optimizer antidote``, ``trainer.py`` ``AntidoteTrainer.save_mask``,
``utils.py`` ``prune_wanda_outlier``; script ``script/finetune/antidote_poison_ratio.sh``):

1. Calibration data: BeaverTails harmful pairs (``--sample_num $bad_sample_num`` = 2000), each tokenized as the
   full training sample, prompt + harmful answer + EOS; batch size 1, so no padding.
2. One pass of the *unpruned* fine-tuned model over them (layer by layer, but the masks are only applied at the
   end, so every layer sees the unpruned model). For every pruned linear module, scaler_j = Σ over all tokens of
   the calibration samples (prompt tokens included) of x_j², x = the module's input.
3. Wanda score S_ij = |W_ij| · sqrt(scaler_j). Ranking is **per output row**: in each row the
   cols − int(cols·(1 − dense_ratio)) highest-scoring entries are selected (sort per row, stable).
4. The selected ("harmful") entries are set to zero: ``param.data *= (1 - bad_mask)``. dense_ratio = 0.1.
5. Pruned modules: with a LoRA fine-tune, the ``nn.Linear`` modules whose name contains "lora" inside the decoder
   layers, i.e. the lora_A and lora_B factors of the user's fine-tuning LoRA (#2; LoRA #1 is merged into the base);
   with full fine-tuning, the q_proj, k_proj and v_proj weights.

Here (``target: auto``) the same choice is made from the run: the fine-tune adapter's lora_A/lora_B factors when
the fine-tune was a LoRA (then the adapter is merged and the merged model returned), otherwise the merged model's
``modules`` (q/k/v). ``target: weights`` prunes the merged fine-tuned model's ``modules`` whatever the topology.

Differences from the original, none changing what is selected:

* The activation statistic is the plain sum of x² over the calibration tokens. The original keeps a running mean
  over samples; a positive factor common to every column does not change a per-row ranking.
* Calibration runs in batches; padding positions are excluded from the sums through the attention mask, so the
  result equals the original's batch-size-1 pass. ``tokens: response`` (not in the original) counts the answer
  tokens only.
* The per-row count is ceil(dense_ratio·cols), the original's cols − int(cols·(1 − r)) without its float
  rounding (e.g. r = 0.9, cols = 10: 1 − 0.9 = 0.0999…, int(0.999…) = 0, so the original zeroes 10, not 9).
* Not copied: the OWL ("outlier-weighted layerwise sparsity", Hyper_m = 3, λ = 0.08) code is commented out in
  the original; every layer uses the same ratio. The original reads harmful samples 5001–6999 with a strict
  inequality (1999 samples, not 2000); here the first ``n_samples`` of the plan's alignment_harmful role.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ftguard.config import RunConfig
from ftguard.cost import GpuSpec, alignment_n, cost_result, train_seconds
from ftguard.errors import FtguardError
from ftguard.methods.base import PostMethod
from ftguard.methods.context import PostContext
from ftguard.methods.registry import register_method
from ftguard.schema import ConfigError, check

log = logging.getLogger(__name__)


@dataclass
class AntidoteConfig:
    # antidote_poison_ratio.sh: dense_ratio=0.1.
    dense_ratio: float = field(
        default=0.1,
        metadata={"help": "fraction of each weight row zeroed: the top ceil(r·cols) by Wanda score"},
    )
    # antidote_poison_ratio.sh: bad_sample_num=2000 (passed as --sample_num).
    n_samples: int = field(
        default=2000,
        metadata={
            "help": "harmful calibration samples (prompt + harmful answer); fewer if alignment_harmful is smaller"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "calibration batch size (padding never counts)"})
    target: Literal["auto", "adapter", "weights"] = field(
        default="auto",
        metadata={
            "help": "auto: the fine-tune LoRA's lora_A/lora_B when there is one (the original), else weights; "
            "weights: the merged fine-tuned model's `modules`"
        },
    )
    # utils.py find_layers, full fine-tuning branch: q_proj, k_proj, v_proj.
    modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
        metadata={"help": "linear modules (name suffixes) pruned in the merged model when target is weights"},
    )
    tokens: Literal["all", "response"] = field(
        default="all",
        metadata={"help": "calibration tokens counted: all (prompt + answer, the original) or response"},
    )

    def __post_init__(self) -> None:
        check(0.0 <= self.dense_ratio <= 1.0, "dense_ratio", f"must be in [0, 1], got {self.dense_ratio}")
        check(self.n_samples >= 1, "n_samples", f"must be ≥ 1, got {self.n_samples}")
        check(self.batch_size >= 1, "batch_size", f"must be ≥ 1, got {self.batch_size}")
        check(
            bool(self.modules),
            "modules",
            "give at least one linear module name, e.g. [q_proj, k_proj, v_proj]",
        )


def per_row_count(cols: int, ratio: float) -> int:
    """Entries zeroed in each row; rounding the product first keeps 30·0.1 = 3.0000000000000004 at 3."""
    return min(cols, math.ceil(round(cols * ratio, 6)))


def find_linears(model: nn.Module, suffixes: list[str]) -> dict[str, nn.Linear]:
    """Linear modules whose last name component is one of ``suffixes``, e.g. every layer's q_proj."""
    found = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes
    }
    if not found:
        raise FtguardError(f"antidote: no linear module named {suffixes} in the model: fix post.args.modules")
    return found


def lora_factors(model: nn.Module) -> dict[str, nn.Linear]:
    """The lora_A / lora_B linears of a PEFT LoRA model (``...q_proj.lora_A.default``)."""
    found = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (".lora_A." in n or ".lora_B." in n)
    }
    if not found:
        raise FtguardError(
            "antidote: the fine-tune adapter has no LoRA factors: use post.args.target=weights"
        )
    return found


def input_sq_sums(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    batches: Iterator[dict[str, torch.Tensor]],
    response_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Σ over the real calibration tokens of x_j² for the input x of each module (Wanda's ‖X_j‖², fp32).

    A token counts where ``attention_mask`` is 1 (and, with ``response_only``, ``labels`` ≠ -100), so padding adds
    nothing whatever the batch composition.
    """
    sums = {
        name: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device)
        for name, m in modules.items()
    }
    keep: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().float()
            weight = keep["mask"].to(x.device, torch.float32).reshape(*keep["mask"].shape, 1)
            sums[name] += (x.pow(2) * weight).reshape(-1, x.shape[-1]).sum(0)

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch["attention_mask"].bool()
                if response_only:
                    mask = mask & (batch["labels"] != -100)
                keep["mask"] = mask
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums


def wanda_prune(
    modules: dict[str, nn.Linear], sq_sums: dict[str, torch.Tensor], ratio: float
) -> dict[str, int]:
    """Zero, in every row of every module, the ceil(ratio·cols) entries with the largest |W_ij|·sqrt(Σx_j²).

    Returns the number of entries zeroed per module.
    """
    counts = {}
    with torch.no_grad():
        for name, m in modules.items():
            k = per_row_count(m.in_features, ratio)
            if k == 0:
                counts[name] = 0
                continue
            score = m.weight.detach().float().abs() * sq_sums[name].to(m.weight.device).sqrt().unsqueeze(0)
            top = torch.topk(score, k, dim=1).indices
            m.weight.scatter_(1, top, 0.0)
            counts[name] = top.numel()
    return counts


def calibration_batches(dataset: Any, batch_size: int, pad_id: int, device: torch.device) -> Iterator[dict]:
    """Right-padded batches of a tokenized dataset (input_ids, attention_mask, labels)."""

    def pad(seqs: list[list[int]], value: int, width: int) -> torch.Tensor:
        return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], device=device)

    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        width = max(len(ids) for ids in rows["input_ids"])
        yield {
            "input_ids": pad(rows["input_ids"], pad_id, width),
            "attention_mask": pad(rows["attention_mask"], 0, width),
            "labels": pad(rows["labels"], -100, width),
        }


@register_method
class Antidote(PostMethod):
    """Zero the fine-tuned weights with the highest Wanda importance on harmful data (per output row).

    1. Tokenize the first ``n_samples`` harmful pairs (prompt + harmful answer) of the plan.
    2. Load the model to prune: the fine-tune LoRA on its base (LoRA fine-tunes, the original) or the merged
       fine-tuned model (``target: weights`` or full fine-tuning).
    3. One no-grad pass: Σ x_j² over the real tokens for the input of each pruned module.
    4. Per row, zero the ceil(dense_ratio·cols) entries with the largest |W_ij|·sqrt(Σ x_j²).
    5. Merge the adapter (if any) and return the model, with per-module zeroed counts and the total fraction.
    """

    name = "antidote"
    paper = "Huang et al., Antidote: Post-fine-tuning Safety Alignment for LLMs against Harmful Fine-tuning, ICML 2025"
    summary = (
        "one-shot zeroing of the top dense_ratio weights by Wanda score on harmful data (post-fine-tuning)"
    )
    config_class = AntidoteConfig
    required_roles = ("alignment_harmful",)

    def check_run_config(self, run: RunConfig, stage: str) -> None:
        # Under the single topology the fine-tune keeps training the alignment LoRA: its factors hold the
        # alignment and the user's update together, and zeroing them would prune the alignment as well.
        continues_alignment = run.adapter.topology == "single" and run.align is not None
        if self.config.target != "weights" and continues_alignment and run.finetune is not None:
            raise ConfigError(
                "post.method antidote with adapter.topology single: the fine-tune continues the alignment LoRA, "
                "so its lora_A/lora_B hold the alignment too and pruning them would undo it. Use "
                "adapter.topology: double (the original's: a fresh LoRA for the user's fine-tune) or "
                "post.args.target: weights (prune the merged q/k/v weights)"
            )

    def _load(self, ctx: Any) -> tuple[nn.Module, dict[str, nn.Linear], str]:
        cfg, ref = self.config, ctx.finetuned
        target = cfg.target
        if target == "auto":
            target = "adapter" if ref.adapter_dir else "weights"
        if target == "weights":
            model = ctx.load(ref)
            return model, find_linears(model, cfg.modules), target
        if not ref.adapter_dir:
            raise FtguardError(
                "antidote: target=adapter needs a LoRA fine-tune: use post.args.target=weights"
            )
        from ftguard.methods.context import ModelRef
        from ftguard.models.adapters import load_lora

        # The single topology trains on top of base_dir; the double topology on the merged aligned model.
        base = ModelRef(model_dir=ref.base_dir or ctx.aligned.model_dir)
        model = load_lora(ctx.load(base), ref.adapter_dir, trainable=False)
        return model, lora_factors(model), target

    def cost(self, run: RunConfig, n_params: float, gpu: GpuSpec) -> dict[str, Any]:
        # One forward over the harmful calibration pairs for the Wanda scores; the pruning itself is elementwise.
        n_align, note = alignment_n(run)
        n = min(self.config.n_samples, n_align)
        tokens = n * run.model.max_length
        flops = tokens * 2.0 * n_params
        notes = [
            f"{run.model.name} N={n_params:.3g}",
            note,
            f"antidote: a forward over {n} calibration samples × {run.model.max_length} tokens",
        ]
        return cost_result(train_seconds(flops, gpu.peak_tflops, gpu), tokens, flops, notes)

    def repair(self, ctx: PostContext) -> tuple[Any, dict[str, Any]]:
        from ftguard.data.template import tokenize_dataset

        cfg, mc = self.config, ctx.run.model
        examples = ctx.plan.alignment_harmful[: cfg.n_samples]
        if len(examples) < cfg.n_samples:
            log.warning(
                "antidote: %d harmful calibration samples available, %d asked", len(examples), cfg.n_samples
            )
        dataset, _ = tokenize_dataset(
            examples,
            ctx.tokenizer,
            max_length=mc.max_length,
            style=mc.template,
            response_newline=mc.response_newline,
        )
        model, modules, target = self._load(ctx)
        device = next(model.parameters()).device
        pad_id = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else 0
        sums = input_sq_sums(
            model,
            modules,
            calibration_batches(dataset, cfg.batch_size, pad_id, device),
            response_only=cfg.tokens == "response",
        )
        counts = wanda_prune(modules, sums, cfg.dense_ratio)
        pruned = sum(m.weight.numel() for m in modules.values())
        if target == "adapter":
            model = model.merge_and_unload()
        total = sum(counts.values())
        report = {
            "target": target,
            "dense_ratio": cfg.dense_ratio,
            "calibration_samples": len(dataset),
            "calibration_tokens": int(sum(len(ids) for ids in dataset["input_ids"])),
            "zeroed_total": total,
            "pruned_params": pruned,
            "zeroed_fraction": total / pruned,
            "zeroed": counts,
        }
        log.info("antidote: zeroed %d of %d %s weights (%.4f)", total, pruned, target, total / pruned)
        return model, report
