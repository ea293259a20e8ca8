"""Panacea: a perturbation optimised during the fine-tuning stage and added to the fine-tuned model (Wang, Huang,
Shen, Yao, Luo, Liu, Tan, Huang, Tao, "Panacea: Mitigating Harmful Fine-tuning for Large Language Models via
Post-fine-tuning Perturbation", NeurIPS 2025; docs/methods.md, Panacea).

The paper's problem is max_w max_{‖ε‖≤ρ} λ·[h(w + ε) − h(w)] − ℓ(w): fine-tune on the user's data (ℓ) while making
a perturbation of norm ρ raise the harmful loss h as much as possible, then ship w + ε. The authors' code
(``w-yibo/Panacea``: ``trainer.py`` ``Panacea.training_step`` under ``--tag eps``, ``train.py``) runs it inside
the provider's fine-tuning, per step, with a user batch x and a harmful batch x′ of 10:

1. g_ℓ = ∇ℓ(w) on x; g_h = ∇h(w) on x′.
2. ε = ρ·g_h/(‖g_h‖ + 1e-7), one global L2 norm over every trainable tensor (the inner max in closed form).
   ε is overwritten at every step, never accumulated.
3. w ← w + ε, g_h′ = ∇min(h(w + ε), 5) on x′, w ← w − ε.
4. The step's gradient is g_ℓ − λ·(g_h′ − g_h); the Trainer clips it and takes the AdamW step.
5. After ``trainer.train()``, ``train.py`` adds the last ε to the trainable parameters (``--add_eps True``) and
   saves: the shipped model is w_T + ε_T, ε_T computed at the weights before the last optimizer step.

What is perturbed is every trainable parameter of the stage: in the authors' script the alignment LoRA (r 32,
α 4 on q, k, v), which the fine-tuning keeps training (``--alternating single_lora``), so ftguard prefers the
single topology; with double it is the fresh fine-tuning LoRA, with full every weight. The saved adapter and the
merged model both hold ε: :meth:`PanaceaTrainer.train` adds it once the Trainer's loop has returned, and the
stage saves ``trainer.model`` after that (``pipeline/stages.py``); checkpoints hold w and ε apart (ε is method
state), so a resume, even one at the last step, ships the same w_T + ε_T.

Differences from the authors' code (docs/methods.md, Panacea):

* The released step backpropagates ``clip_loss_h``, a name never assigned (the clamped loss is bound to
  ``loss_h``), and ``train.py`` builds ``Pancacea``: it does not run as released. ftguard backpropagates the
  clamped loss, as intended; ``harmful_loss_cap`` (5) is the clamp's bound, null for none. Above it the clamp's
  gradient is 0, so g_h′ drops out of that step.
* w is restored from a saved copy (bit-exact), not by subtracting ε back.
* g_h and g_h′ come from ``torch.autograd.grad`` and never touch ``.grad``; g_ℓ is the Trainer's own step, and
  the λ-term is scaled by 1/GA, so gradient accumulation sums micro-batches as for SFT (the original's scripts
  run accumulation 1 only). ε is the last micro-batch's.
* The logged loss is ℓ (the original logs the clamped h(w + ε)); h, h(w + ε), ‖g_h‖ and the clamp are
  recorded as ``panacea_*`` metrics, and ‖ε‖ of the shipped perturbation is appended to the train log.
* Norms and the step length are float32 whatever the training precision.
* Data parallel: g_h is averaged over the ranks before ε is formed, and the clamp tests the ranks' mean of
  h(w + ε), so every rank holds the same ε and N processes train as one with the whole batches.
* The harmful set is the first ``harmful_samples`` of the plan's ``alignment_harmful`` (the harmful answers of the
  alignment prompts, 1000): the original's ``BeaverTails_dangerous`` rows after index 5000 are, with the Booster
  code's ``utils.SupervisedDataset``, the harmful answers of records 5001–5999 (999, strict comparisons), the
  first of the records its SFT alignment trained refusals for.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.booster import HarmfulGradients, global_norm, trainable_params
from ftguard.methods.registry import register_method
from ftguard.schema import check
from ftguard.training.trainer import FtguardTrainer

if TYPE_CHECKING:
    from datasets import Dataset

    from ftguard.config import RunConfig
    from ftguard.data.example import Example
    from ftguard.data.plan import DataPlan
    from ftguard.methods.context import StageContext

log = logging.getLogger(__name__)

PERTURB_EPS = 1e-7  # added to ‖g_h‖ before normalising, as trainer.py Panacea.training_step
HARMFUL = "harmful"


@dataclass
class PanaceaConfig:
    # Defaults: script/finetune/panacea_gsm8k.sh and trainer.py of w-yibo/Panacea (docs/methods.md, Panacea).
    lam: float = field(
        default=0.001,
        metadata={
            "help": "λ, weight of the harmful-loss increase h(w + ε) − h(w) (panacea_gsm8k.sh lamb: 0.001)"
        },
    )
    rho: float = field(
        default=1.0,
        metadata={"help": "ρ, norm of the perturbation ε = ρ·∇h/‖∇h‖ (panacea_gsm8k.sh eps_rho: 1)"},
    )
    harmful_batch_size: int = field(
        default=10,
        metadata={"help": "harmful batch size per step and device (hard-coded 10 in the original's loader)"},
    )
    harmful_samples: int | None = field(
        default=1000,
        metadata={
            "help": "the first N harmful answers of the alignment prompts (alignment_harmful) form the harmful "
            "set; null = all (panacea_gsm8k.sh bad_sample_num: 1000)"
        },
    )
    harmful_loss_cap: float | None = field(
        default=5.0,
        metadata={
            "help": "h(w + ε) is clamped at this value before its backward (trainer.py: torch.clamp(max=5)); "
            "null = no clamp"
        },
    )
    add_perturbation: bool = field(
        default=True,
        metadata={
            "help": "add the last ε to the trained weights before saving (train.py --add_eps True); false = "
            "ship w_T alone, an ablation"
        },
    )

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.lam) and self.lam >= 0, "lam", f"must be a finite number ≥ 0, got {self.lam}"
        )
        check(math.isfinite(self.rho) and self.rho > 0, "rho", f"must be a finite number > 0, got {self.rho}")
        check(
            self.harmful_batch_size >= 1, "harmful_batch_size", f"must be ≥ 1, got {self.harmful_batch_size}"
        )
        check(
            self.harmful_samples is None or self.harmful_samples >= 1,
            "harmful_samples",
            f"must be ≥ 1 or null (all), got {self.harmful_samples}",
        )
        cap = self.harmful_loss_cap
        check(
            cap is None or (math.isfinite(cap) and cap > 0),
            "harmful_loss_cap",
            f"must be a finite number > 0 or null (no clamp), got {cap}",
        )


class PanaceaTrainer(HarmfulGradients, FtguardTrainer):
    """Panacea's step, first order (ε is not differentiated), per micro-batch with the Trainer's user batch x and a
    harmful batch x′ of ``harmful_batch_size``:

    1. g_h = ∇h(w) on x′; ε = ρ·g_h/(‖g_h‖ + 1e-7), kept as the stage's perturbation.
    2. w ← w + ε, g_h′ = ∇min(h(w + ε), cap) on x′ (0 when h(w + ε) > cap), then w restored from a copy.
    3. λ·(g_h − g_h′)/GA is added to ``.grad``, then the Trainer's own step adds g_ℓ = ∇ℓ(w) on x (GA scaling,
       mixed precision, the one synchronised backward under DDP). The returned (logged) loss is ℓ.

    After training, :meth:`train` adds the last ε to the trainable weights. Cost 3F + 3B per micro-batch; extra
    memory: ε and a copy of the trainable weights, and two harmful gradients during the step.
    """

    epsilon: list[torch.Tensor] | None = None  # the last micro-batch's ε, in the parameters' dtype

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        cfg: PanaceaConfig = self.method_config
        self.begin_step(model)  # schedule-free optimizers swap weights here: perturb the training weights
        params = trainable_params(model)
        harmful = self.aux_batch(HARMFUL, cfg.harmful_batch_size)

        # DDP: as Booster's step, the harmful passes neither arm the reducer nor touch .grad; the λ-term joins
        # .grad before ℓ's backward, so DDP's one reduce per optimizer step carries the combined gradient.
        with self.accelerator.no_sync(model):
            h, g_h = self.harmful_grad(model, harmful, params)
            h, g_h = self.mean_over_ranks(h, g_h)
            g_norm = global_norm(g_h)
            step = cfg.rho / (g_norm + PERTURB_EPS)
            epsilon = [(g.float() * step).to(p.dtype) for p, g in zip(params, g_h, strict=True)]

            # w + ε, then back to w from a copy: subtracting ε again is not bit-exact in floating point.
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, e in zip(params, epsilon, strict=True):
                    p.add_(e)
            try:
                h_eps, g_h_eps = self.harmful_grad(model, harmful, params)
            finally:
                with torch.no_grad():
                    for p, s in zip(params, saved, strict=True):
                        p.copy_(s)
            del saved
            # The clamp is decided on the global batch's loss, as one process holding the whole batch would.
            h_eps, _ = self.mean_over_ranks(h_eps, [])

        capped = cfg.harmful_loss_cap is not None and h_eps.item() > cfg.harmful_loss_cap
        coef = cfg.lam / self.current_gradient_accumulation_steps * self.loss_scale()
        with torch.no_grad():
            for p, g, g_eps in zip(params, g_h, g_h_eps, strict=True):
                term = (g if capped else g - g_eps).mul_(coef).to(p.dtype)
                if p.grad is None:
                    p.grad = term
                else:
                    p.grad.add_(term)
        del g_h, g_h_eps
        self.epsilon = epsilon
        self.record(
            panacea_harmful_loss=h,
            panacea_harmful_loss_perturbed=h_eps,
            panacea_harmful_loss_increase=h_eps - h,
            panacea_harmful_grad_norm=g_norm,
            panacea_capped=float(capped),
        )
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.method_config.add_perturbation:
            self.add_perturbation()
        return result

    def add_perturbation(self) -> None:
        """w_T ← w_T + ε_T on the trainable parameters of ``self.model``, which the stage then saves."""
        if self.epsilon is None:
            raise FtguardError(
                "panacea: no training step computed the perturbation ε, so there is nothing to add to the model "
                "(the stage ran no step, or resumed from a checkpoint without Panacea's state)"
            )
        params = trainable_params(self.model)
        with torch.no_grad():
            for p, e in zip(params, self.epsilon, strict=True):
                p.add_(e.to(device=p.device, dtype=p.dtype))
        norm = global_norm(self.epsilon).item()
        log.info("panacea: added the perturbation ε (‖ε‖ = %.4g) to the fine-tuned weights", norm)
        # In train_log.json, which the stage writes after this: the saved model holds ε.
        self.state.log_history.append({"panacea_perturbation_norm": norm, "step": self.state.global_step})

    def method_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.epsilon is None:
            return {}, {}
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return {"panacea_epsilon": True}, dict(zip(names, self.epsilon, strict=True))

    def load_method_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not values.get("panacea_epsilon"):
            return
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if set(tensors) != {n for n, _ in named}:
            raise FtguardError(
                "panacea: the checkpoint's perturbation ε does not match this model's trainable parameters "
                "(changed adapter or topology?): delete the stage's checkpoints folder and rerun the stage"
            )
        self.epsilon = [tensors[n].to(device=p.device, dtype=p.dtype) for n, p in named]


@register_method
class Panacea(Method):
    """Panacea in the fine-tuning stage (docs/methods.md, Panacea): the user's fine-tune plus λ·[h(w) − h(w + ε)],
    ε = ρ·∇h/‖∇h‖ on a harmful set, and the last ε added to the model that is saved."""

    name = "panacea"
    # Three full passes per micro-batch, as Booster's: harmful at w, harmful at w + ε, the user's batch.
    pass_factor = 3.0
    stages = ("finetune",)
    paper = (
        "Wang et al., Panacea: Mitigating Harmful Fine-tuning for Large Language Models via Post-fine-tuning "
        "Perturbation, NeurIPS 2025"
    )
    summary = (
        "fine-tune on ℓ − λ·[h(w + ε) − h(w)], ε = ρ·∇h/‖∇h‖ on a harmful set; the last ε is added to the saved "
        "model (3F+3B per step)"
    )
    config_class, trainer_class = PanaceaConfig, PanaceaTrainer
    required_roles = ("alignment_harmful",)
    # The authors' script keeps training the alignment LoRA (--alternating single_lora).
    preferred_topology = "single"
    # The bench's and the demo's alignment sets are smaller than the paper's 1000 harmful samples.
    bench_args: ClassVar[dict[str, Any]] = {"harmful_samples": None}
    demo_args: ClassVar[dict[str, Any]] = {"harmful_samples": None}
    unsupported_modes: ClassVar[dict[str, str]] = {
        **{
            mode: "it steps the trainable weights in place to w + ε, restores them, and adds ε to them after "
            f"training, which needs every rank to hold them whole, and {label} shards them"
            for mode, label in (("fsdp", "FSDP"), ("deepspeed_zero3", "ZeRO-3"))
        },
        **{
            f"deepspeed_zero{stage}": "it adds λ·(g_h − g_h′) to .grad before the backward, and DeepSpeed keeps "
            "gradients in buffers of its own, which that write is not known to reach"
            for stage in (0, 1, 2)
        },
    }

    def prepare_data(self, plan: DataPlan, run: RunConfig, stage: str) -> None:
        super().prepare_data(plan, run, stage)
        self._harmful_set(plan, stage)

    def extra_datasets(self, ctx: StageContext) -> dict[str, Dataset]:
        return {HARMFUL: ctx.tokenize(self._harmful_set(ctx.plan, ctx.stage))}

    def _harmful_set(self, plan: DataPlan, stage: str) -> list[Example]:
        pool, n = plan.alignment_harmful, self.config.harmful_samples
        if not pool:
            raise FtguardError(
                f"{stage}.method 'panacea' needs harmful answers for the alignment prompts (the data plan's "
                "alignment_harmful set), and it is empty: give data.alignment and data.finetune.harmful the same "
                "source and split (e.g. beavertails_refusals train) with response: safe and response: unsafe"
            )
        if n is not None and n > len(pool):
            raise FtguardError(
                f"{stage}.args.harmful_samples = {n} but the data plan has {len(pool)} harmful answers of the "
                "alignment prompts: lower it, set it to null (all of them), or raise data.alignment.n"
            )
        return pool if n is None else pool[:n]
