"""Booster: alignment that attenuates harmful perturbation (Huang et al., ICLR 2025; docs/methods.md,
Booster)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.registry import register_method
from ftguard.methods.vaccine import VaccineTrainer
from ftguard.schema import ConfigError, check
from ftguard.training.trainer import FtguardTrainer

if TYPE_CHECKING:
    from datasets import Dataset

    from ftguard.config import RunConfig
    from ftguard.methods.context import StageContext

log = logging.getLogger(__name__)

PROBE_EPS = 1e-7  # added to ‖g_h‖ in the probe step, as in the original (docs/methods.md, Booster)
REDUCE_BUCKET = 1 << 25  # elements per all-reduce of g_h across ranks


@dataclass
class BoosterConfig:
    # Defaults: Booster's smooth_align.sh (docs/methods.md, Booster).
    lam: float = field(
        default=5.0,
        metadata={
            "help": "λ, weight of the harmful-perturbation penalty h(w) − h(w − α·ĝ_h) (Booster: 5; GSM8K 25)"
        },
    )
    alpha: float = field(
        default=0.1, metadata={"help": "α, length of the simulated normalised harmful step (Booster: 0.1)"}
    )
    harmful_batch_size: int = field(
        default=10,
        metadata={"help": "harmful batch size per step and device (hard-coded 10 in the original)"},
    )
    harmful_data: Literal["alignment_harmful"] = field(
        default="alignment_harmful",
        metadata={
            "help": "harmful set: alignment_harmful = the harmful answers of the alignment prompts (the "
            "paper's records 5001–9999; docs/methods.md, Alignment data)"
        },
    )
    # Beyond the paper (opt-in): the λ-term is a gradient of the same weights' harmful landscape, which moves
    # slowly under a small learning rate; reusing it trades exactness for ~1 pass instead of 3 on most steps.
    refresh_every: int = field(
        default=1,
        metadata={
            "help": "compute λ·(g_h − g_h′) every k optimizer steps and add the last one on the steps between "
            "(1 = Booster; k > 1 an approximation: 3 passes on one step of k, 1 on the others)"
        },
    )
    allow_double_topology: bool = field(
        default=False,
        metadata={
            "help": "allow adapter.topology double (an ablation: the paper fine-tunes Booster's own LoRA, "
            "topology single: Booster issue #2; docs/methods.md, Adapter topologies)"
        },
    )

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.lam) and self.lam >= 0, "lam", f"must be a finite number ≥ 0, got {self.lam}"
        )
        check(
            math.isfinite(self.alpha) and self.alpha > 0,
            "alpha",
            f"must be a finite number > 0, got {self.alpha}",
        )
        check(
            self.harmful_batch_size >= 1, "harmful_batch_size", f"must be ≥ 1, got {self.harmful_batch_size}"
        )
        check(self.refresh_every >= 1, "refresh_every", f"must be ≥ 1, got {self.refresh_every}")


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One L2 norm over all ``tensors``, in float32."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


class HarmfulGradients:
    """Mixin for FtguardTrainer subclasses that step the weights along a harmful gradient (Booster, Panacea)."""

    def harmful_grad(
        self, model: nn.Module, batch: dict[str, Any], params: list[nn.Parameter]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h on ``batch`` (mean over response tokens) and its gradient, in loss-scaled units, without touching .grad."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
        scale = self.loss_scale()
        grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, params, materialize_grads=True)
        # The probe direction is scale-free; the norm is logged and used for the step in true units.
        grads = [g / scale for g in grads] if scale != 1.0 else list(grads)
        return loss.detach(), grads

    def loss_scale(self) -> float:
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def mean_over_ranks(
        self, h: torch.Tensor, grads: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h and g_h averaged over the data-parallel ranks, in place (unchanged in a single process).

        The mean of the ranks' batch means is the mean over the global batch when the ranks' shares hold as many
        response tokens (as for the Trainer's own loss when it does not count tokens across devices).
        """
        world = self.args.world_size
        if world <= 1:
            return h, grads
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        tensors = [h.detach().float().reshape(1).clone(), *grads]
        i = 0
        while i < len(tensors):
            # Flat buckets of one dtype: few collectives for a LoRA, bounded extra memory for a full model.
            j, size = i, 0
            while (
                j < len(tensors)
                and tensors[j].dtype == tensors[i].dtype
                and (size == 0 or size + tensors[j].numel() <= REDUCE_BUCKET)
            ):
                size += tensors[j].numel()
                j += 1
            flat = _flatten_dense_tensors(tensors[i:j])
            dist.all_reduce(flat)
            flat.div_(world)
            for t, reduced in zip(tensors[i:j], _unflatten_dense_tensors(flat, tensors[i:j]), strict=True):
                t.copy_(reduced)
            i = j
        return tensors[0][0].to(h.dtype), grads


class BoosterTrainer(HarmfulGradients, FtguardTrainer):
    """Booster's step: f(w) + λ·[h(w) − h(w − α·∇h(w)/‖∇h(w)‖)], first order (straight-through).

    Per micro-batch, with the Trainer's alignment batch x and a harmful batch x′ of ``harmful_batch_size``:

    1. g_h = ∇h(w) on x′.
    2. Probe: w ← w − α·g_h/(‖g_h‖ + 1e-7) on the trainable parameters (one global norm over all of them),
       g_h′ = ∇h at the probed weights, then w is restored bit-exactly from a saved copy.
    3. g_f = ∇f(w) on x (the Trainer's own step: GA scaling, mixed precision, backward).
    4. The gradient of this micro-batch is g_f + λ·(g_h − g_h′), accumulated into ``.grad``: f scaled as the
       Trainer scales it (1/GA, or by the response tokens of the whole accumulated batch when it passes
       num_items_in_batch), the λ-term by 1/GA (h is a per-batch mean), so accumulation sums micro-batches as
       for SFT; the Trainer then clips (1.0) and takes the AdamW step on the combined gradient. The loss
       returned (logged) is f.

    Cost: 3F + 3B per micro-batch. Extra memory: one copy of the trainable parameters and two gradients.

    Data parallel (N ranks): x′ is the global harmful batch, N·``harmful_batch_size`` rows, each rank holding its
    share; g_h is averaged over the ranks before step 2 (one extra all-reduce of the trainable gradients per
    micro-batch), so every rank probes the same point and N processes train as one with the whole batches.

    The original zeroes ``.grad`` between its passes, which is only right with accumulation 1; here g_h and g_h′
    come from ``torch.autograd.grad`` and never touch ``.grad``, so earlier micro-batches' gradients survive.

    ``refresh_every: k`` (opt-in, not the paper's): steps 1–2 and the λ-term run on optimizer steps that are
    multiples of k; the step's whole λ-term (summed over its micro-batches, per rank before DDP's average) is
    kept, and each step in between adds it once, at its first micro-batch, and runs step 3 alone. The kept term
    is checkpointed with the method state; a step that finds none (a resume from an older checkpoint) computes it.
    """

    _kept: list[torch.Tensor] | None = None  # the last refresh's λ-term, unscaled, and the step that made it
    _kept_step = -1
    _reused_step = -1

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        cfg: BoosterConfig = self.method_config
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()  # schedule-free optimizers swap weights here: probe the training weights
        params = trainable_params(model)
        opt_step = self.state.global_step
        if (
            cfg.refresh_every > 1
            and opt_step % cfg.refresh_every
            and self._kept is not None
            and self._kept_step < opt_step
        ):
            if self._reused_step != opt_step:  # once per optimizer step, whatever the accumulation
                self._reused_step = opt_step
                with torch.no_grad():
                    for p, term in zip(params, self._kept, strict=True):
                        term = (term * self.loss_scale()).to(device=p.device, dtype=p.dtype)
                        p.grad = term if p.grad is None else p.grad.add_(term)
            self.record(booster_refreshed=0.0)
            return super().training_step(model, inputs, num_items_in_batch)
        harmful = self.aux_batch("harmful", cfg.harmful_batch_size)

        # DDP: the two harmful passes run under no_sync and take their gradients with torch.autograd.grad, so
        # they neither arm DDP's reducer nor all-reduce anything, and .grad is untouched. The λ-term is added to
        # the local .grad BEFORE f's backward (step 3). The Trainer runs that backward with sync on only for the
        # last micro-batch of an optimizer step, and DDP then all-reduces the whole accumulated .grad (earlier
        # micro-batches + every λ-term + g_f) once: one reduce per optimizer step, of the combined gradient.
        # The harmful batch of a step is the global one (each rank draws its share): g_h is averaged over the
        # ranks before the probe, so every rank probes the same point, the one a single process with the whole
        # harmful batch would probe, and DDP's average of the ranks' g_h′ completes the global λ-term.
        with self.accelerator.no_sync(model):
            # 1. g_h = ∇h(w) on x′.
            h, g_h = self.harmful_grad(model, harmful, params)
            h, g_h = self.mean_over_ranks(h, g_h)
            g_norm = global_norm(g_h)

            # 2. Probe at w − α·g_h/(‖g_h‖ + eps), then restore w exactly from a copy (adding the step back is
            #    not bit-exact in floating point).
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                step = cfg.alpha / (g_norm + PROBE_EPS)
                for p, g in zip(params, g_h, strict=True):
                    p.sub_((g.float() * step).to(p.dtype))
            try:
                h_probed, g_h_probed = self.harmful_grad(model, harmful, params)
            finally:
                with torch.no_grad():
                    for p, s in zip(params, saved, strict=True):
                        p.copy_(s)
            del saved

        # 4 (first half). Accumulate λ·(g_h − g_h′), scaled like f for gradient accumulation (h is a per-batch
        # mean, so it always takes the 1/GA factor) and by the fp16 loss scale (the GradScaler unscales .grad as
        # a whole before clipping). Adding it before f's backward puts it inside the single DDP reduce.
        coef = cfg.lam / self.current_gradient_accumulation_steps
        with torch.no_grad():
            if cfg.refresh_every > 1:
                if self._kept_step != opt_step:
                    self._kept, self._kept_step = [torch.zeros_like(g) for g in g_h], opt_step
                for kept, g, g_probed in zip(self._kept, g_h, g_h_probed, strict=True):
                    kept.add_(g - g_probed, alpha=coef)
            for p, g, g_probed in zip(params, g_h, g_h_probed, strict=True):
                term = (g - g_probed).mul_(coef * self.loss_scale()).to(p.dtype)
                if p.grad is None:
                    p.grad = term
                else:
                    p.grad.add_(term)
        del g_h, g_h_probed

        if cfg.refresh_every > 1:
            self.record(booster_refreshed=1.0)
        self.record(
            booster_harmful_loss=h,
            booster_harmful_loss_probed=h_probed,
            booster_harmful_loss_reduction=h - h_probed,
            booster_harmful_grad_norm=g_norm,
        )
        # 3. g_f = ∇f(w) on x, accumulated by the Trainer's own step (GA scaling, autocast, backward); with the
        #    λ-term already in .grad this completes step 4. The returned loss is f.
        return super().training_step(model, inputs, num_items_in_batch)

    def method_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self._kept is None:
            return {}, {}
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return {"booster_kept_step": self._kept_step}, dict(zip(names, self._kept, strict=True))

    def load_method_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not values:
            return
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if set(tensors) != set(names):
            raise FtguardError(
                "Booster: the checkpoint's kept harmful term does not match this model's trainable parameters "
                "(changed adapter or topology?): delete the stage's checkpoints folder and rerun the stage"
            )
        self._kept, self._kept_step = [tensors[n] for n in names], int(values["booster_kept_step"])


@register_method
class Booster(Method):
    """Booster in the alignment stage: SFT on refusals plus λ·(harmful loss − harmful loss after a simulated
    normalised harmful step). Fine-tuning afterwards must continue the same LoRA (topology
    single; docs/methods.md, Adapter topologies)."""

    name = "booster"
    # Three full passes per step: harmful at w, harmful at the probed w, alignment. Bench 3.28× / 3.11×.
    pass_factor = 3.0
    stages = ("align",)
    paper = "Huang et al., Booster: Tackling Harmful Fine-tuning for Large Language Models via Attenuating Harmful Perturbation, ICLR 2025"
    summary = "alignment + λ·[h(w) − h(w − α·∇h/‖∇h‖)] on a harmful set (3F+3B per step)"
    config_class = BoosterConfig
    trainer_class = BoosterTrainer
    required_roles = ("alignment_harmful",)
    preferred_topology = "single"  # fine-tuning continues its LoRA (docs/methods.md, Adapter topologies)
    unsupported_modes: ClassVar[dict[str, str]] = {
        **{
            mode: "its probe steps the trainable weights in place (w − α·ĝ_h) and restores them, which needs every "
            f"rank to hold them whole, and {label} shards them"
            for mode, label in (("fsdp", "FSDP"), ("deepspeed_zero3", "ZeRO-3"))
        },
        **{
            f"deepspeed_zero{stage}": "it adds λ·(g_h − g_h′) to .grad before the backward, and DeepSpeed keeps "
            "gradients in buffers of its own, which that write is not known to reach"
            for stage in (0, 1, 2)
        },
    }

    def check_run_config(self, run: RunConfig, stage: str) -> None:
        cfg = self.config
        if run.adapter.topology != "double" or run.finetune is None:
            # single (the paper's) and full both fine-tune the very weights Booster perturbed; without a
            # fine-tuning stage the topology changes nothing.
            return
        message = (
            "Booster hardens the alignment LoRA against a harmful step taken IN that LoRA, so the fine-tuning "
            "stage must keep training it: the paper (Table 1) and its maintainer (Booster issue #2) use the "
            "single topology (docs/methods.md, Adapter topologies); with 'double' the fine-tuning trains a "
            "fresh LoRA that Booster never saw"
        )
        if not cfg.allow_double_topology:
            raise ConfigError(
                f"'adapter.topology' is double but {message}. Set adapter.topology: single, or "
                f"{stage}.args.allow_double_topology: true to run the double-LoRA ablation"
            )
        log.warning(
            "%s.args.allow_double_topology: running Booster with adapter.topology double, an ablation: %s",
            stage,
            message,
        )

    def extra_datasets(self, ctx: StageContext) -> dict[str, Dataset]:
        examples = getattr(ctx.plan, self.config.harmful_data)
        if not examples:
            raise FtguardError(
                f"Booster needs a harmful set ({ctx.stage}.args.harmful_data = {self.config.harmful_data}: the harmful "
                "answers of the alignment prompts) but the data plan has none. They are taken from the file shared "
                "by data.alignment and data.finetune.harmful: give both the same source/split (e.g. "
                "beavertails_refusals train) with data.alignment.response: safe and data.finetune.harmful.response: "
                "unsafe, and check that this file has harmful answers"
            )
        return {"harmful": ctx.tokenize(examples)}


# ----------------------------------------------------------------------- variant: Booster + Vaccine


@dataclass
class BoosterVaccineConfig(BoosterConfig):
    # Booster repo's --perturb_aware True (docs/methods.md, Booster+Vaccine): ρ = 5.
    rho: float = field(
        default=5.0,
        metadata={"help": "Vaccine's perturbation radius ρ on the attention outputs (Booster's variant: 5)"},
    )
    attention_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "class name(s) of the attention sub-modules Vaccine perturbs; null = found automatically"
        },
    )
    # Read by VaccineTrainer: the variant perturbs every layer, as Vaccine itself (not a config key).
    layers: ClassVar[str] = "all"
    topk: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            math.isfinite(self.rho) and self.rho >= 0, "rho", f"must be a finite number ≥ 0, got {self.rho}"
        )
        check(
            self.attention_modules is None or len(self.attention_modules) > 0,
            "attention_modules",
            "must be null (automatic) or a non-empty list of class names",
        )


class BoosterVaccineTrainer(BoosterTrainer, VaccineTrainer):
    """Booster + Vaccine: Booster's steps 1, 2 and 4, with step 3 (g_f) replaced by Vaccine's perturbation-aware
    alignment gradient (``VaccineTrainer.training_step``; docs/methods.md, Vaccine), 4F + 4B per
    micro-batch.

    The method resolution order makes ``super().training_step`` in ``BoosterTrainer`` Vaccine's step, so nothing
    is copied: Booster adds λ·(g_h − g_h′) to ``.grad`` first, then Vaccine's perturbed backward (the only
    synchronised one under DDP) adds its gradient. The loss the Trainer logs is Vaccine's perturbed f.
    """


@register_method
class BoosterVaccine(Booster):
    """Booster's harmful-perturbation penalty on top of Vaccine's perturbation-aware alignment
    (docs/methods.md, Booster+Vaccine)."""

    name = "booster_vaccine"
    # Booster with Vaccine's two-pass alignment gradient instead of one pass: 4F + 4B.
    pass_factor = 4.0
    stages = ("align",)
    paper = "Huang et al., Booster, ICLR 2025 (Booster+Vaccine variant, --perturb_aware True)"
    summary = "Booster with the alignment gradient replaced by Vaccine's (ρ = 5); 4F+4B per step"
    config_class = BoosterVaccineConfig
    trainer_class = BoosterVaccineTrainer
