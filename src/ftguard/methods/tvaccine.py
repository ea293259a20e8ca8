"""T-Vaccine: Vaccine's perturbation on a sampled subset of safety-critical layers, the others frozen.

Liu, Lin, Huang, Mo, Mu & Shen, "Targeted Vaccine: Safety Alignment for Large Language Models against Harmful
Fine-Tuning via Layer-wise Perturbation", arXiv:2410.09760, 2024; code Lslland/T-Vaccine (``BaseTrainer`` in
``trainer.py``, run by ``train.py --optimizer mesfa``; defaults from ``script/alignment/T-Vaccine.sh``).

Per optimizer step t (docs/methods.md, T-Vaccine), with L attention layers:

1. Scores, when t is a multiple of K (``score_interval``): one harmful batch (``harmful_batch_size`` rows of the
   first ``harmful_n`` harmful answers to the alignment prompts), s_l = ‖∂h/∂(attention output l)‖, and
   p_l = s_l / Σ_k s_k (no temperature, no squaring).
2. Layers, when t is a multiple of J (``sample_interval``): S = ``n_layers`` distinct layers drawn successively with
   probability ∝ p among the layers not yet drawn (numpy's ``choice(replace=False, p=p)``; here
   ``torch.multinomial`` without replacement, the same distribution); they stay until the next draw.
3. Freeze: the trainable weights inside the attention modules of the other L − S layers take no gradient in
   this step. Their ``.grad`` stays None, so AdamW skips them: no update, no weight decay, moments untouched.
4. Vaccine's two passes on the alignment batch, restricted to the S layers: g_l by ``torch.autograd.grad`` (no
   weight gradients), ε_l = ρ·g_l/(‖g_S‖ + 1e-7) with one norm over the S layers, then forward + backward with
   ε_l added to those attention outputs. With S = L this is exactly ``vaccine``.

Differences from the authors' code:

* Steps are optimizer steps: scores and draws happen once, at the first micro-batch of steps t ≡ 0 (mod K or J).
  The original tests ``global_step`` in every micro-batch (re-scoring and re-drawing at each micro-batch of such
  a step) and calls ``model.zero_grad()`` after its scoring pass and its first pass, erasing the earlier
  micro-batches' gradients: right only with accumulation 1, which its scripts use.
* The first pass takes activation gradients only (as ``vaccine``), instead of a full backward thrown away.
* MLP (non-attention) LoRA weights train in every layer, as the code's ``unfreeze_activate_layers`` (attention
  modules only) says. In the original, every decoder layer but the chosen ones (and, for models of over 26
  layers, the one below each chosen one) runs under reentrant activation checkpointing, the torch 2.1 default;
  with frozen embeddings, every layer below the lowest one run normally then passes no gradient, so its MLP LoRA
  does not train either.
  That side effect of a memory optimisation is not reproduced; ftguard uses the run's own checkpointing setting.
  ``freeze: layer`` freezes every trainable weight of the unchosen decoder layers (the paper's "keeping other
  layers frozen"); with LoRA on the attention projections only (ftguard's presets) the two settings coincide.
* Draws use a generator seeded from (seed, step), identical on every rank and after a resume, instead of the
  global numpy stream. If fewer than S layers have s_l > 0 (the original raises), the rest are drawn uniformly.
* Data parallel: s_l is over the global harmful batch (squared norms summed over ranks), as ε over the global
  alignment batch in ``vaccine``.

Logged: tvaccine_grad_norm (‖g_S‖ of the loss as logged), tvaccine_perturbation_norm (‖ε‖ = ρ),
tvaccine_clean_loss, tvaccine_perturbed_loss, tvaccine_harmful_loss (at scoring steps); the chosen layers at info.
"""

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
from ftguard.methods.vaccine import _ATTENTION_HELP, Vaccine, VaccineTrainer
from ftguard.schema import check
from ftguard.training.hooks import add_to_outputs

if TYPE_CHECKING:
    from datasets import Dataset

    from ftguard.data.example import Example
    from ftguard.data.plan import DataPlan
    from ftguard.methods.context import StageContext

log = logging.getLogger(__name__)

STREAM = "harmful"
SEED_STRIDE = 1_000_003  # separates the per-step draw seeds of runs whose seeds differ by 1


@dataclass
class TVaccineConfig:
    # ρ = 3: the README's example run (`bash T-Vaccine.sh 3`); the script takes ρ as its first argument.
    rho: float = field(
        default=3.0,
        metadata={"help": "perturbation radius ρ: L2 norm of ε over the chosen layers (README: 3)"},
    )
    # S, J, K, prompt_data_size: T-Vaccine.sh (its DecodingTrust/Qwen2-7B script uses S = 5).
    n_layers: int = field(
        default=8, metadata={"help": "S, attention layers perturbed and trained per step (T-Vaccine.sh: 8)"}
    )
    sample_interval: int = field(
        default=20, metadata={"help": "J, optimizer steps between two draws of the layers (T-Vaccine.sh: 20)"}
    )
    score_interval: int = field(
        default=200,
        metadata={
            "help": "K, optimizer steps between two computations of the layer scores (T-Vaccine.sh: 200)"
        },
    )
    harmful_n: int = field(
        default=200,
        metadata={"help": "harmful samples scored: the first n of alignment_harmful (prompt_data_size: 200)"},
    )
    # The original's harmful loader hard-codes batch_size 1.
    harmful_batch_size: int = field(
        default=1, metadata={"help": "harmful rows per scoring pass and device (original: 1)"}
    )
    freeze: Literal["attention", "layer"] = field(
        default="attention",
        metadata={
            "help": "attention = freeze the trainable weights of the unchosen attention modules (the code); "
            "layer = of the whole unchosen decoder layers (the paper's wording)"
        },
    )
    attention_modules: list[str] | None = field(default=None, metadata={"help": _ATTENTION_HELP})

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.rho) and self.rho >= 0, "rho", f"must be a finite number ≥ 0, got {self.rho}"
        )
        for key in ("n_layers", "sample_interval", "score_interval", "harmful_n", "harmful_batch_size"):
            check(getattr(self, key) >= 1, key, f"must be an integer ≥ 1, got {getattr(self, key)}")
        check(
            self.attention_modules is None or len(self.attention_modules) > 0,
            "attention_modules",
            "must be null (automatic) or a non-empty list of class names",
        )


def layer_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """p_l = s_l / Σ s (float64 on the CPU); uniform if every score is 0."""
    s = scores.detach().double().cpu()
    if not torch.isfinite(s).all():
        raise FtguardError(
            f"tvaccine: the harmful gradient norms are not finite ({s.tolist()}): the run diverged"
        )
    total = s.sum()
    return s / total if total > 0 else torch.full_like(s, 1.0 / len(s))


def sample_layers(probabilities: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k distinct layers (sorted), drawn one after another with probability ∝ p among those left; once the layers
    with p > 0 are used up, the rest uniformly."""
    positive = int((probabilities > 0).sum())
    drawn = []
    if positive:
        drawn = torch.multinomial(
            probabilities, min(k, positive), replacement=False, generator=generator
        ).tolist()
    if len(drawn) < k:
        rest = [i for i in range(len(probabilities)) if i not in drawn]
        drawn += [rest[j] for j in torch.randperm(len(rest), generator=generator)[: k - len(drawn)].tolist()]
    return sorted(drawn)


class TVaccineTrainer(VaccineTrainer):
    """T-Vaccine's step (module docstring): Vaccine's passes on the drawn layers, the other layers frozen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        train_args = kwargs.get("args")
        # Frozen weights get no gradient in a step: DDP must expect unused parameters (accelerate reads this at init).
        if train_args is not None and train_args.ddp_find_unused_parameters is None:
            train_args.ddp_find_unused_parameters = True
        super().__init__(*args, **kwargs)
        self.probabilities: torch.Tensor | None = None
        self.chosen: list[int] | None = None
        self.scored_at: int | None = None
        self.chosen_at: int | None = None
        self._layer_cache: tuple[int, list[nn.Module]] | None = None

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            self.begin_step(model)
            inputs = self._prepare_inputs(inputs)
            modules = self.attention_modules(model)
            chosen = self.choose_layers(model, self.state.global_step)
            frozen = self.frozen_parameters(model, chosen)
            for p in frozen:
                p.grad = None  # stays None: the optimizer skips the weight (no step, no decay)
                p.requires_grad_(False)
            try:
                clean_loss, grads = self.attention_gradients(model, inputs, num_items_in_batch, layers=chosen)
                grad_norm = self.layer_sq_norms(grads).sum().sqrt()
                eps = self.epsilon(grads, list(range(len(chosen))), grad_norm)
                del grads
                eps_norm = self.accelerator.reduce(
                    torch.stack([e.pow(2).sum() for e in eps]).sum(), "sum"
                ).sqrt()
                with add_to_outputs([modules[i] for i in chosen], eps):
                    loss = self.scaled_loss(model, inputs, num_items_in_batch)
                    self.accelerator.backward(loss)
                del inputs, eps
            finally:
                # Restored after each micro-batch: outside the step (saving, evaluation, DDP) nothing looks frozen.
                for p in frozen:
                    p.requires_grad_(True)
            steps = self.current_gradient_accumulation_steps
            self.record(
                tvaccine_grad_norm=grad_norm * steps,
                tvaccine_perturbation_norm=eps_norm,
                tvaccine_clean_loss=clean_loss * steps,
                tvaccine_perturbed_loss=loss.detach() * steps,
            )
            return loss.detach()

    def choose_layers(self, model: nn.Module, step: int) -> list[int]:
        """The layers of optimizer step ``step``: scores every K steps, a draw every J (once per step, at its first
        micro-batch); both also when missing (a resume without method state)."""
        cfg: TVaccineConfig = self.method_config
        n = len(self.attention_modules(model))
        if cfg.n_layers > n:
            raise FtguardError(f"align.args.n_layers = {cfg.n_layers} but the model has {n} attention layers")
        if self.probabilities is None or (step % cfg.score_interval == 0 and self.scored_at != step):
            harmful = self.aux_batch(STREAM, cfg.harmful_batch_size)
            harmful_loss, grads = self.attention_gradients(model, harmful)
            self.probabilities = layer_probabilities(self.layer_sq_norms(grads).sqrt())
            self.scored_at = step
            self.record(tvaccine_harmful_loss=harmful_loss * self.current_gradient_accumulation_steps)
        if self.chosen is None or (step % cfg.sample_interval == 0 and self.chosen_at != step):
            generator = torch.Generator().manual_seed(self.args.seed * SEED_STRIDE + step)
            self.chosen = sample_layers(self.probabilities, cfg.n_layers, generator)
            self.chosen_at = step
            log.info("tvaccine: step %d perturbs and trains layers %s", step, self.chosen)
        return self.chosen

    def frozen_parameters(self, model: nn.Module, chosen: list[int]) -> list[nn.Parameter]:
        """The trainable weights of the unchosen attention modules (``freeze: layer``: decoder layers)."""
        units = self.attention_modules(model)
        if self.method_config.freeze == "layer":
            if self._layer_cache is None or self._layer_cache[0] != id(model):
                parent = {id(c): m for m in model.modules() for c in m.children()}
                self._layer_cache = (id(model), [parent[id(a)] for a in units])
            units = self._layer_cache[1]
        keep = set(chosen)
        return [p for i, u in enumerate(units) if i not in keep for p in u.parameters() if p.requires_grad]

    def method_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.probabilities is None:
            return {}, {}
        values = {"chosen": self.chosen, "chosen_at": self.chosen_at, "scored_at": self.scored_at}
        return values, {"probabilities": self.probabilities}

    def load_method_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if values and "probabilities" in tensors:
            self.probabilities = tensors["probabilities"].double()
            self.chosen, self.chosen_at, self.scored_at = (
                values[k] for k in ("chosen", "chosen_at", "scored_at")
            )


@register_method
class TVaccine(Method):
    """Targeted Vaccine: Vaccine's worst-case ε on S attention layers drawn ∝ their harmful-gradient norm, the
    other layers' attention weights frozen (docs/methods.md, T-Vaccine)."""

    name = "tvaccine"
    # Vaccine's two passes (the first stops at the lowest chosen layer, the second forms no weight gradient for
    # the frozen weights), plus one small harmful pass every K steps.
    pass_factor = 2.0
    stages = ("align",)
    paper = (
        "Liu, Lin, Huang, Mo, Mu & Shen, Targeted Vaccine: Safety Alignment for Large Language Models against "
        "Harmful Fine-Tuning via Layer-wise Perturbation, arXiv:2410.09760, 2024"
    )
    summary = (
        "Vaccine's ε (‖ε‖ = ρ) on S layers drawn ∝ harmful-gradient norm, the others frozen; 2F+2B per step"
    )
    config_class = TVaccineConfig
    trainer_class = TVaccineTrainer
    required_roles = ("alignment_harmful",)
    unsupported_modes: ClassVar[dict[str, str]] = {
        **Vaccine.unsupported_modes,
        **{
            f"deepspeed_zero{stage}": "its frozen weights must stay out of the optimizer step (their .grad None), "
            "and DeepSpeed steps every weight from gradient buffers of its own"
            for stage in (0, 1, 2)
        },
    }

    def _pool(self, plan: DataPlan) -> list[Example]:
        return plan.alignment_harmful[: self.config.harmful_n]

    def train_examples(self, examples: list[Example], plan: DataPlan) -> tuple[list[Example], dict[str, Any]]:
        return examples, {"harmful_pool": "alignment_harmful", "harmful_pool_size": len(self._pool(plan))}

    def extra_datasets(self, ctx: StageContext) -> dict[str, Dataset]:
        pool = self._pool(ctx.plan)
        if not pool:
            raise FtguardError(
                "tvaccine scores the layers on harmful answers to the alignment prompts (the data plan's "
                "alignment_harmful set), and it is empty: point data.alignment and data.finetune.harmful at the "
                "same paired file (e.g. beavertails_refusals, response: safe and unsafe) so that it is built"
            )
        return {STREAM: ctx.tokenize(pool)}
