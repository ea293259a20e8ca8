"""EWC: elastic weight consolidation in the fine-tuning stage, as Vaccine's baseline (docs/methods.md, EWC).

The original (``git-disl/Vaccine`` ``trainer.py`` ``FITrainer``, run by ``script/EWC_finetune/*.sh``) computes,
at the first training step, a diagonal Fisher F = Σ over the batches of its 2,000-sample BeaverTails-safe eval
set (its alignment data) of the squared gradients of the LoRA weights, then trains on ℓ + λ·Σ F⊙(W − W₀)², where
W₀ are the weights at the start of fine-tuning. Differences, each a bug or an accident of the original:

* The original leaves the last Fisher batch's gradient in ``.grad``, so it is added to the first training step's
  gradient; here the Fisher gradients come from ``torch.autograd.grad`` and never touch ``.grad``.
* The original adds the penalty to every micro-batch's loss without the 1/GA factor (its scripts use GA 1); here
  the penalty's gradient enters once per optimizer step whatever the accumulation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ftguard.cost import ExtraCost, alignment_n
from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.registry import register_method
from ftguard.schema import check
from ftguard.training.trainer import FtguardTrainer

if TYPE_CHECKING:
    from datasets import Dataset

    from ftguard.config import RunConfig
    from ftguard.data.plan import DataPlan
    from ftguard.methods.context import StageContext

log = logging.getLogger(__name__)

FISHER_STREAM = "fisher"


@dataclass
class EWCConfig:
    # Vaccine script/EWC_finetune/{sst2,agnews,gsm8k}.sh: lamb=${4:-1e9} (train.py's own --lamb default, 0.001, is
    # never used by an EWC script). F is a sum over batches, not a mean, so λ's scale depends on the set size.
    lam: float = field(
        default=1e9, metadata={"help": "λ, weight of Σ F⊙(W − W₀)² (Vaccine's EWC scripts: 1e9)"}
    )
    fisher_samples: int | None = field(
        default=None,
        metadata={
            "help": "first N samples of the alignment set used for the Fisher; null = all of it (Vaccine: its "
            "2,000-sample BeaverTails-safe eval set, which is its alignment set)"
        },
    )
    fisher_batch_size: int = field(
        default=5,
        metadata={
            "help": "batch size of the Fisher passes; F sums one squared gradient per batch (Vaccine: "
            "per_device_eval_batch_size 5)"
        },
    )

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.lam) and self.lam >= 0, "lam", f"must be a finite number ≥ 0, got {self.lam}"
        )
        check(
            self.fisher_samples is None or self.fisher_samples >= 1,
            "fisher_samples",
            f"must be ≥ 1 or null, got {self.fisher_samples}",
        )
        check(self.fisher_batch_size >= 1, "fisher_batch_size", f"must be ≥ 1, got {self.fisher_batch_size}")


def rank_batches(n: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """This rank's share of the consecutive batches ``[0, bs), [bs, 2bs), …`` of an n-sample set (round robin).

    The batches are those of a single process whatever the world size, so the summed Fisher does not depend on it.
    """
    batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    return batches[rank::world_size]


class EWCTrainer(FtguardTrainer):
    """Fine-tuning on ℓ + λ·Σ F⊙(w − w₀)² over the trainable weights w.

    1. At the first micro-batch, once: w₀ = the current trainable weights; F = Σ_b (∇f_b(w₀))² over the
       consecutive batches b of the Fisher set (the alignment data), f_b the mean response CE of batch b, in train
       mode (as the original: LoRA dropout is active). Under DDP each rank takes every world_size-th batch and the
       ranks' partial sums are all-reduced (SUM) once, so every rank holds the same F, the single-process one.
    2. Every micro-batch: the penalty's gradient 2λ·F⊙(w − w₀), divided by the accumulation steps (it depends on
       w only, so an optimizer step gets it once), is added to ``.grad`` before ℓ's backward; DDP's one reduce per
       optimizer step then carries it (identical on every rank, so the average keeps it). Then the Trainer's own
       SFT step on the user batch. The loss returned (logged) is ℓ + penalty, as the original's; the penalty
       alone is logged as ``ewc_penalty``.

    F and w₀ are saved in every checkpoint and restored on resume, never recomputed at later weights.
    Cost: one elementwise pass over the trainable weights per step (plus the one-off Fisher passes); memory: two
    copies of the trainable weights (F, w₀).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None
        self.fisher_batches = 0

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        # self.model is never the DDP wrapper, so the names do not depend on the launch (they key the checkpoint).
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        cfg: EWCConfig = self.method_config
        if self.fisher is None:
            if self.state.global_step > 0:
                raise FtguardError(
                    f"EWC resumed at step {self.state.global_step} from a checkpoint without its Fisher and anchor "
                    "weights: delete the stage's checkpoints folder and rerun the stage"
                )
            self._compute_fisher(model)  # 1.
        assert self.fisher is not None and self.anchor is not None

        # 2. Penalty and its gradient, in fp32; into .grad scaled like ℓ (1/GA, fp16 loss scale).
        coef = 2.0 * cfg.lam / self.current_gradient_accumulation_steps * self._loss_scale()
        penalty = torch.zeros((), device=self.args.device)
        with torch.no_grad():
            for name, p in self._trainable():
                fisher, anchor = self._on(name, p.device)
                diff = p.detach().float() - anchor
                weighted = fisher * diff
                penalty = penalty + (weighted * diff).sum().to(penalty.device)
                term = weighted.mul_(coef).to(p.dtype)
                if p.grad is None:
                    p.grad = term
                else:
                    p.grad.add_(term)
        penalty = cfg.lam * penalty
        self.record(ewc_penalty=penalty)
        loss = super().training_step(model, inputs, num_items_in_batch)
        return loss + (penalty / self.current_gradient_accumulation_steps).to(loss.device)

    def _on(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Restored state arrives on the CPU; move it next to its parameter once.
        assert self.fisher is not None and self.anchor is not None
        if self.fisher[name].device != device:
            self.fisher[name] = self.fisher[name].to(device)
            self.anchor[name] = self.anchor[name].to(device)
        return self.fisher[name], self.anchor[name]

    def _compute_fisher(self, model: nn.Module) -> None:
        cfg: EWCConfig = self.method_config
        dataset = self.aux_datasets.get(FISHER_STREAM)
        if dataset is None or len(dataset) == 0:
            raise FtguardError(
                "EWC needs its Fisher set (the alignment data) but none was given to the trainer"
            )
        named = self._trainable()
        params = [p for _, p in named]
        self.anchor = {n: p.detach().float().clone() for n, p in named}
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        mine = rank_batches(len(dataset), cfg.fisher_batch_size, rank, world)
        scale = self._loss_scale()
        self.begin_step(model)  # train mode, as the original (its Fisher loop runs inside training_step)
        # No .backward(): DDP's reducer is never armed and .grad stays untouched (the original left the last
        # Fisher batch's gradient in .grad).
        with self.accelerator.no_sync(model):
            for rows in mine:
                batch = self._prepare_inputs(self.data_collator([dataset[i] for i in rows]))
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, batch)
                grads = torch.autograd.grad(loss * scale, params, materialize_grads=True)
                for acc, g in zip(sums, grads, strict=True):
                    acc.add_((g.float() / scale).square())
        if distributed:
            flat = torch.cat([s.flatten() for s in sums])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            sums = [t.view_as(s) for t, s in zip(flat.split([s.numel() for s in sums]), sums, strict=True)]
        self.fisher = {n: s for (n, _), s in zip(named, sums, strict=True)}
        self.fisher_batches = len(rank_batches(len(dataset), cfg.fisher_batch_size, 0, 1))
        total = sum(float(s.sum()) for s in sums)
        log.info(
            "EWC: Fisher of %d trainable tensors from %d samples in %d batches (ΣF = %.4g)",
            len(sums),
            len(dataset),
            self.fisher_batches,
            total,
        )

    def _loss_scale(self) -> float:
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    # ------------------------------------------------------------------ checkpoint state

    def method_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.fisher is None or self.anchor is None:
            return {}, {}
        tensors = {f"fisher/{n}": t for n, t in self.fisher.items()}
        tensors.update({f"anchor/{n}": t for n, t in self.anchor.items()})
        return {"ewc_fisher_batches": self.fisher_batches}, tensors

    def load_method_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        fisher = {k.removeprefix("fisher/"): v for k, v in tensors.items() if k.startswith("fisher/")}
        anchor = {k.removeprefix("anchor/"): v for k, v in tensors.items() if k.startswith("anchor/")}
        names = {n for n, _ in self._trainable()}
        if not fisher:
            return  # a checkpoint from before the first step has nothing to restore; training_step checks the rest
        if set(fisher) != names or set(anchor) != names:
            raise FtguardError(
                "EWC: the checkpoint's Fisher/anchor tensors do not match this model's trainable parameters "
                "(changed adapter or topology?): delete the stage's checkpoints folder and rerun the stage"
            )
        self.fisher, self.anchor = fisher, anchor
        self.fisher_batches = int(values.get("ewc_fisher_batches", 0))


@register_method
class EWC(Method):
    """EWC in the fine-tuning stage (Vaccine's baseline; docs/methods.md, EWC): SFT on the user data plus
    λ·Σ F⊙(W − W₀)², F the diagonal Fisher of the alignment loss at the start of fine-tuning."""

    name = "ewc"
    # Plain SFT per step; the one-off Fisher pass is counted by extra_cost.
    pass_factor = 1.0
    stages = ("finetune",)
    paper = "Kirkpatrick et al., Overcoming catastrophic forgetting in neural networks, PNAS 2017 (as Vaccine's baseline)"
    summary = "fine-tuning + λ·Σ F⊙(W − W₀)², F = squared alignment gradients at the start (≈1× SFT per step)"
    config_class = EWCConfig
    trainer_class = EWCTrainer
    required_roles = ("alignment",)
    preferred_topology = "single"  # Vaccine's EWC keeps training the alignment LoRA (docs/methods.md, EWC)
    unsupported_modes: ClassVar[dict[str, str]] = {
        "fsdp": "it keeps whole copies of the trainable weights (F, w₀) and adds its penalty gradient to their "
        ".grad, and FSDP shards both",
        "deepspeed_zero3": "it keeps whole copies of the trainable weights (F, w₀), and ZeRO-3 partitions them",
        **{
            f"deepspeed_zero{stage}": "it adds its penalty gradient to .grad before the backward, and DeepSpeed "
            "keeps gradients in buffers of its own, which that write is not known to reach"
            for stage in (0, 1, 2)
        },
    }

    def check_run_config(self, run: RunConfig, stage: str) -> None:
        if run.adapter.topology == "double":
            log.warning(
                "finetune.method ewc with adapter.topology double: the penalty then anchors the fresh fine-tuning "
                "LoRA, whose lora_B starts at zero, so every lora_A gets a zero Fisher and is not held at all; "
                "Vaccine's EWC keeps training the alignment LoRA (adapter.topology: single; docs/methods.md, "
                "EWC)"
            )

    def prepare_data(self, plan: DataPlan, run: RunConfig, stage: str) -> None:
        super().prepare_data(plan, run, stage)
        self._fisher_examples(plan, f"{stage}.args.fisher_samples")

    def extra_cost(self, run: RunConfig, stage: str) -> ExtraCost:
        n_align, _ = alignment_n(run)
        n = n_align if self.config.fisher_samples is None else self.config.fisher_samples
        return ExtraCost(
            one_off_tokens=n * run.model.max_length,
            notes=[f"ewc: one Fisher pass over {n} alignment samples"],
        )

    def _fisher_examples(self, plan: DataPlan, key: str = "finetune.args.fisher_samples") -> list:
        n = self.config.fisher_samples
        if n is not None and n > len(plan.alignment):
            raise FtguardError(
                f"{key} = {n} but the alignment set has {len(plan.alignment)} samples: lower it, set it to null "
                "(all), or raise data.alignment.n"
            )
        return plan.alignment if n is None else plan.alignment[:n]

    def extra_datasets(self, ctx: StageContext) -> dict[str, Dataset]:
        examples = self._fisher_examples(ctx.plan, f"{ctx.stage}.args.fisher_samples")
        if not examples:
            raise FtguardError(
                "EWC needs the alignment data for its Fisher but the data plan has none: check data.alignment"
            )
        return {FISHER_STREAM: ctx.tokenize(examples)}
