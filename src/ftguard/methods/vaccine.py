"""Vaccine: perturbation-aware alignment (docs/methods.md, Vaccine), and its RandomVaccine ablation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.registry import register_method
from ftguard.schema import check
from ftguard.training.hooks import (
    OutputCapture,
    add_gaussian_noise,
    add_to_outputs,
    find_attention_modules,
    output_gradients,
)
from ftguard.training.trainer import FtguardTrainer

NORM_EPS = 1e-7  # the original's denominator guard in ε = ρ·g/(‖g‖ + 1e-7) (docs/methods.md, Vaccine)

_ATTENTION_HELP = (
    "class name(s) of the attention sub-modules to perturb (e.g. [LlamaAttention]); null = found automatically "
    "(the one '*Attention' child of each decoder layer)"
)


@dataclass
class VaccineConfig:
    # ρ = 2 in the Vaccine README and scripts (Booster's copy saves ρ = 5; docs/methods.md, Vaccine and
    # Original-code bugs #6).
    rho: float = field(
        default=2.0, metadata={"help": "perturbation radius ρ: global L2 norm of ε over all perturbed layers"}
    )
    attention_modules: list[str] | None = field(default=None, metadata={"help": _ATTENTION_HELP})
    # "all" is the paper's method; "topk" a deterministic layer-subset ablation (T-Vaccine is `tvaccine`).
    layers: Literal["all", "topk"] = field(
        default="all",
        metadata={
            "help": "all = perturb every layer (Vaccine); topk = only the topk layers with the largest ‖g_l‖"
        },
    )
    topk: int | None = field(default=None, metadata={"help": "number of layers perturbed when layers = topk"})

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.rho) and self.rho >= 0, "rho", f"must be a finite number ≥ 0, got {self.rho}"
        )
        check(
            self.attention_modules is None or len(self.attention_modules) > 0,
            "attention_modules",
            "must be null (automatic) or a non-empty list of class names",
        )
        if self.layers == "topk":
            check(
                self.topk is not None and self.topk >= 1,
                "topk",
                f"must be an integer ≥ 1 when layers = topk, got {self.topk}",
            )
        else:
            check(self.topk is None, "topk", "is only used with layers = topk; remove it or set layers: topk")


@dataclass
class RandomVaccineConfig:
    # Noise variance ρ (docs/methods.md, RandomVaccine). The original random_Vaccine.sh never ran, so no value
    # of its own is known; Vaccine's ρ = 2 is used.
    rho: float = field(
        default=2.0,
        metadata={"help": "variance of the Gaussian noise added to each attention output (std √ρ)"},
    )
    attention_modules: list[str] | None = field(default=None, metadata={"help": _ATTENTION_HELP})

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.rho) and self.rho >= 0, "rho", f"must be a finite number ≥ 0, got {self.rho}"
        )
        check(
            self.attention_modules is None or len(self.attention_modules) > 0,
            "attention_modules",
            "must be null (automatic) or a non-empty list of class names",
        )


class _AttentionPerturbationTrainer(FtguardTrainer):
    """What Vaccine and RandomVaccine share: the attention modules of the model."""

    _attention_cache: tuple[int, list[nn.Module]] | None = None

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        if self._attention_cache is None or self._attention_cache[0] != id(model):
            self._attention_cache = (
                id(model),
                find_attention_modules(model, self.method_config.attention_modules),
            )
        return self._attention_cache[1]


class VaccineTrainer(_AttentionPerturbationTrainer):
    """Vaccine (Huang et al., NeurIPS 2024; docs/methods.md, Vaccine): min_w max_{‖ε‖≤ρ} f(w; h_l + ε_l),
    the inner max solved by one normalised gradient step. Per micro-batch B, 2 forward + 2 backward passes:

    1. Forward on B capturing the output h_l of every attention sub-module; g_l = ∂f/∂h_l by
       ``torch.autograd.grad`` on those activations: no weight gradient is computed, no ``.grad`` is touched,
       and no DDP all-reduce happens (the pass runs under ``no_sync``).
    2. G = sqrt(Σ_l ‖g_l‖²), one norm over all layers, examples and positions (prompt and padding included);
       ε_l = ρ·g_l/(G + 1e-7), detached. Under data parallelism G is over the global batch (the per-layer
       squared norms are summed over ranks), so N processes with batch b perturb as one process with N·b. f is the loss as it is backpropagated (divided by the accumulation
       steps unless the Trainer scales by num_items_in_batch), as in the original's hooks: the direction of ε
       does not depend on that scale, only the negligible 1e-7 guard does.
    3. Forward + backward on B with ε_l added to each attention output (a constant for autograd). Only these
       gradients reach ``.grad``, so the optimizer step (after the Trainer's clipping) uses them alone, and
       accumulation over micro-batches works as for SFT.

    ``layers: topk`` perturbs only the k layers with the largest ‖g_l‖ of this batch, with ‖ε‖ = ρ over those
    layers: a deterministic ablation. It is not T-Vaccine's selection (layers drawn in proportion to the
    harmful data's gradient norms every few steps, the other layers' attention frozen), which is the
    ``tvaccine`` method. With the default ``layers: all`` the update is exactly Vaccine's, and the stage
    manifest records the option.

    Logged: vaccine_grad_norm (G, of the loss as logged, i.e. multiplied back by the accumulation steps),
    vaccine_perturbation_norm (‖ε‖, = ρ up to the 1e-7 guard), vaccine_clean_loss (pass 1) and
    vaccine_perturbed_loss (pass 3, the Trainer's loss).
    """

    def attention_gradients(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
        layers: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Step 1: the loss and g_l = ∂loss/∂(attention output l) for every layer (for ``layers`` only, in that
        order, when given: T-Vaccine's subset), without weight gradients."""
        modules = self.attention_modules(model)
        if layers is not None:
            modules = [modules[i] for i in layers]
        # Hooks stay until the gradients are taken: checkpointing recomputes the forward during autograd.grad.
        with self.accelerator.no_sync(model), OutputCapture(modules) as capture:
            loss = self.scaled_loss(model, inputs, num_items_in_batch)
            capture.stop()
            grads = output_gradients(loss, capture.outputs)
        return loss.detach(), grads

    def layer_sq_norms(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """‖g_l‖² of each layer, in fp32, over the global batch."""
        # Under data parallelism the batch of a step is the global one: summing the per-layer squared norms over
        # the ranks gives every rank the ε of one process with that batch (a small all-reduce; no-op alone).
        return self.accelerator.reduce(torch.stack([g.detach().float().pow(2).sum() for g in grads]), "sum")

    def epsilon(self, grads: list[torch.Tensor], chosen: list[int], norm: torch.Tensor) -> list[torch.Tensor]:
        """ε_l = ρ·g_l/(norm + 1e-7) in fp32 for each l in ``chosen``, in that order; drops those ``grads[l]``."""
        scale = self.method_config.rho / (norm + NORM_EPS)
        # ε in fp32 whatever the activations' dtype: scaling a bf16 gradient by a bf16-rounded ρ/G missed ‖ε‖ = ρ
        # by up to 0.4% (2⁻⁸), and the hooks add ε in the residual stream's precision, which is fp32 under autocast.
        # Each gradient is dropped as its ε is made: with bf16 activations ε takes twice their gradients' memory, not 3×.
        eps = []
        for i in chosen:
            eps.append(grads[i].detach().float().mul_(scale))
            grads[i] = None
        return eps

    def perturbation(self, grads: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor], torch.Tensor]:
        """Step 2: (indices of the perturbed layers, their ε_l in fp32, G over all layers); consumes ``grads``."""
        cfg = self.method_config
        sq = self.layer_sq_norms(grads)
        grad_norm = sq.sum().sqrt()
        if cfg.layers == "topk":
            if cfg.topk > len(grads):
                raise FtguardError(
                    f"align.args.topk = {cfg.topk} but the model has {len(grads)} attention layers"
                )
            chosen = sorted(torch.topk(sq, cfg.topk).indices.tolist())
            norm = sq[chosen].sum().sqrt()
        else:
            chosen = list(range(len(grads)))
            norm = grad_norm
        return chosen, self.epsilon(grads, chosen, norm), grad_norm

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            self.begin_step(model)
            inputs = self._prepare_inputs(inputs)
            modules = self.attention_modules(model)

            # 1. Activation gradients of the attention outputs (forward + input-only backward).
            clean_loss, grads = self.attention_gradients(model, inputs, num_items_in_batch)

            # 2. ε_l = ρ·g_l/(G + 1e-7), one global norm.
            chosen, eps, grad_norm = self.perturbation(grads)
            del grads
            eps_sq = torch.stack([e.float().pow(2).sum() for e in eps]).sum() if eps else torch.zeros(())
            eps_norm = self.accelerator.reduce(eps_sq, "sum").sqrt()  # over the global batch, as G

            # 3. Forward + backward with ε added; the only gradients that reach the optimizer.
            with add_to_outputs([modules[i] for i in chosen], eps):
                loss = self.scaled_loss(model, inputs, num_items_in_batch)
                self.accelerator.backward(loss)
            del inputs, eps

            steps = self.current_gradient_accumulation_steps
            self.record(
                vaccine_grad_norm=grad_norm * steps,
                vaccine_perturbation_norm=eps_norm,
                vaccine_clean_loss=clean_loss * steps,
                vaccine_perturbed_loss=loss.detach() * steps,
            )
            return loss.detach()


class RandomVaccineTrainer(_AttentionPerturbationTrainer):
    """RandomVaccine (docs/methods.md, RandomVaccine): one forward + one backward pass per micro-batch, with
    fresh Gaussian noise of variance ρ (std √ρ) added to each attention output as a constant for autograd.

    Logged: random_vaccine_noise_norm (global L2 norm of the noise of the step).
    """

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            self.begin_step(model)
            inputs = self._prepare_inputs(inputs)
            modules = self.attention_modules(model)
            with add_gaussian_noise(modules, math.sqrt(self.method_config.rho)) as sq_norms:
                loss = self.scaled_loss(model, inputs, num_items_in_batch)
                # Read before the backward: a checkpointing recomputation appends its (identical) draws again.
                noise_norm = torch.stack(sq_norms).sum().sqrt()
                self.accelerator.backward(loss)
            self.record(random_vaccine_noise_norm=noise_norm)
            return loss.detach()


PAPER = "Huang, Hu & Liu, Vaccine: Perturbation-aware Alignment for LLMs against Harmful Fine-tuning Attack, NeurIPS 2024"


@register_method
class Vaccine(Method):
    """Perturbation-aware alignment: train the alignment loss under the worst-case (one normalised gradient step)
    perturbation of every attention output, so later harmful fine-tuning drifts the embeddings less
    (docs/methods.md, Vaccine)."""

    name = "vaccine"
    # Two passes per step (the perturbation's, then the update's); with LoRA a backward costs about a forward,
    # so 2F + 2F over SFT's 2F. `ftguard bench`: 1.87× (tiny), 2.15× (SmolLM2).
    pass_factor = 2.0
    stages = ("align",)
    paper = PAPER
    summary = "alignment under a worst-case ε (‖ε‖ = ρ) added to every attention output; 2F+2B per step"
    config_class = VaccineConfig
    trainer_class = VaccineTrainer
    # ZeRO-0/1/2 keep the weights whole, and the first pass never reaches a parameter: nothing to refuse there.
    unsupported_modes: ClassVar[dict[str, str]] = {
        mode: f"its first pass is a partial backward (to the attention outputs only), and {label} gathers and "
        "frees the sharded weights in hooks of a full backward over them"
        for mode, label in (("fsdp", "FSDP"), ("deepspeed_zero3", "ZeRO-3"))
    }


@register_method
class RandomVaccine(Method):
    """The Vaccine paper's ablation: Gaussian noise instead of the gradient-based perturbation
    (docs/methods.md, RandomVaccine)."""

    name = "random_vaccine"
    # One pass with Gaussian noise added to the attention outputs.
    pass_factor = 1.0
    stages = ("align",)
    paper = PAPER + " (RandomVaccine ablation)"
    summary = "alignment with Gaussian noise (variance ρ) added to every attention output; 1F+1B per step"
    config_class = RandomVaccineConfig
    trainer_class = RandomVaccineTrainer
