"""AsFT: keep the fine-tuning update along the alignment direction (fine-tuning stage).

Yang et al., "AsFT: Anchoring Safety During LLM Fine-Tuning Within Narrow Safety Basin", AAAI 2026
(arXiv:2506.08473); code PKU-YuanGroup/AsFT (``AsFT_finetuning.py``, ``utils/AsFT_train_utils.py``,
``scripts/gsm8k/AsFT_reg1_p_0.1.sh``). For every regularised weight matrix i (the modules the user's LoRA adapts):

1. V_i = W_aligned,i − W_base,i, the alignment direction: the weights at the start of the stage minus those of
   the model before alignment (``run.model.name``, or ``args.base_model`` when the run has no align stage).
2. C_i = V_i V_iᵀ / ‖V_i‖_F (``projection: approx``, the authors' ``get_aligned_matrix``, SafeLoRA's Eq. 1), or
   the orthogonal projector onto V_i's column space (``projection: exact``, SafeLoRA's exact variant).
3. ΔW_i = B_i A_i, the user LoRA's product without its α/r scaling, as the authors' ``torch.mm(lora_b, lora_a)``.
4. Loss = ℓ + λ · Σ_i ‖(I − C_i) ΔW_i‖²_F; λ = 1 (``--lambda_reg 1``).

Differences from the authors' code, none of which changes the objective where theirs is defined:

* Modules are matched by name. The original pairs the alignment matrices (built by ``zip`` over the base and
  aligned models' ``named_parameters``, kept when a target name is a substring) with the LoRA modules by a
  running counter over parameters named ``lora_A``: any extra substring match shifts every later pair silently.
* C is never formed. One SVD of V_i at the start of the stage gives F_i with C_i = F_i F_iᵀ (approx:
  F = U·diag(σ)/√‖V‖_F; exact: F = U), singular values under numpy's rank tolerance dropped (rounding noise,
  as SafeLoRA's exact mode); then ‖(I − C)BA‖² = Σ (GᵀG) ⊙ (AAᵀ) with G = B − F(FᵀB), in float32 with autocast
  off. The original keeps an [out, out] C per module on the CPU, copies it to the GPU and builds an identity
  matrix every step; equal up to rounding.
* A module the alignment never changed (V = 0) has C = 0, the limit of VVᵀ/‖V‖_F and the projector onto {0}: its
  whole update counts as orthogonal, with a warning naming it. The original divides 0 by 0 and the loss is NaN.
* Gradient accumulation: the term is added to each micro-batch scaled like the CE, so an optimizer step gets
  λ·∇R once (the original adds it unscaled to every micro-batch while dividing the CE; its scripts use 1).
* Topologies beyond the paper's (a fresh LoRA on the aligned model, ``double``): ``single`` continues the
  alignment LoRA, so ΔW = BA − B₀A₀ (the product's change since the start); ``full`` regularises
  ΔW = W − W₀ of ``target_modules`` (the original falls back to plain SFT without LoRA).

Note that the authors' C is not a projector: I − C has eigenvalues 1 − σ_k²/‖V‖_F on V's singular directions,
so an update inside the alignment subspace is penalised too unless σ_k² = ‖V‖_F; only ``exact`` leaves it free.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from ftguard.cost import ExtraCost
from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.registry import register_method
from ftguard.schema import check
from ftguard.training.trainer import FtguardTrainer

if TYPE_CHECKING:
    from ftguard.config import ModelConfig, RunConfig
    from ftguard.methods.context import StageContext

log = logging.getLogger(__name__)


@dataclass
class AsftConfig:
    lam: float = field(
        default=1.0,
        metadata={
            "help": "λ, weight of Σ_modules ‖(I − C)·ΔW‖²_F (the authors' --lambda_reg 1, scripts AsFT_reg1_*)"
        },
    )
    projection: Literal["approx", "exact"] = field(
        default="approx",
        metadata={
            "help": "'approx' = C = VVᵀ/‖V‖_F (the authors' code); 'exact' = the orthogonal projector onto "
            "V's column space, under which updates inside the alignment subspace are free"
        },
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "the model before alignment (a folder or hub id with the same shapes); null = model.name, "
            "the input of the align stage. Required when align is null (e.g. model: a chat model, "
            "base_model: its pretrained base, as in the paper)"
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "module names to regularise (e.g. [q_proj, v_proj]); null = every module the LoRA adapts, "
            "or adapter.finetune.target_modules with topology full"
        },
    )

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.lam) and self.lam >= 0, "lam", f"must be a finite number ≥ 0, got {self.lam}"
        )
        check(
            self.base_model is None or bool(str(self.base_model).strip()),
            "base_model",
            f"must name a model folder or hub id, or be null, got {self.base_model!r}",
        )
        if self.target_modules is not None:
            check(
                bool(self.target_modules)
                and not isinstance(self.target_modules, str)
                and all(isinstance(t, str) and t for t in self.target_modules),
                "target_modules",
                f"must be a non-empty list of module names or null, got {self.target_modules!r}",
            )


# ---------------------------------------------------------------------------------------------- the algebra


def alignment_factor(v: torch.Tensor, projection: str) -> torch.Tensor:
    """F [out, k] with F Fᵀ = C for the alignment direction V [out, in] (step 2); k = 0 when V = 0."""
    u, s, _ = torch.linalg.svd(v.float(), full_matrices=False)
    keep = s > s.max() * max(v.shape) * torch.finfo(torch.float32).eps  # numpy's matrix_rank tolerance
    u, s = u[:, keep], s[keep]
    if projection == "exact" or not keep.any():
        return u.contiguous()
    return (u * (s / torch.linalg.vector_norm(v.float()).sqrt())).contiguous()


def orthogonal_sq(
    factor: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None = None
) -> torch.Tensor:
    """‖(I − F Fᵀ)·ΔW‖²_F for ΔW = left @ right (or ΔW = left), without forming ΔW or C."""
    g = left - factor @ (factor.T @ left)
    if right is None:
        return g.square().sum()
    return ((g.T @ g) * (right @ right.T)).sum()  # tr(GᵀG·HHᵀ), both symmetric


def regularised_modules(model: nn.Module, targets: list[str] | None) -> dict[str, nn.Module]:
    """The modules AsFT regularises, by the plain model's module names: the LoRA-adapted Linear layers (those
    matching ``targets`` if given) of a PEFT model, or the Linear layers matching ``targets`` of a plain one."""
    from peft.tuners.lora import LoraLayer

    def wanted(name: str) -> bool:
        return targets is None or any(name == t or name.endswith("." + t) for t in targets)

    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora = {n: m for n, m in plain.named_modules() if isinstance(m, LoraLayer)}
    if lora:
        found = {n: m for n, m in lora.items() if wanted(n)}
        for name, module in found.items():
            if len(module.active_adapters) != 1 or not isinstance(module.base_layer, nn.Linear):
                raise FtguardError(f"asft: '{name}' must carry one LoRA on a Linear layer")
            if module.use_dora.get(module.active_adapters[0], False):
                raise FtguardError(f"asft: '{name}' uses DoRA, whose update is not B·A")
    else:
        if targets is None:
            raise FtguardError(
                "asft: the model has no LoRA, so finetune.args.target_modules must name modules"
            )
        found = {n: m for n, m in plain.named_modules() if isinstance(m, nn.Linear) and wanted(n)}
    if not found:
        raise FtguardError(
            f"finetune.args.target_modules {targets} match no {'LoRA-adapted' if lora else 'Linear'} module: "
            f"choose from {sorted({n.rsplit('.', 1)[-1] for n in (lora or dict(plain.named_modules()))})}"
        )
    return found


def load_base_weights(
    name: str, modules: list[str], mc: ModelConfig, revision: str | None
) -> dict[str, torch.Tensor]:
    """float32 CPU copies of the named modules' weights in the model before alignment (step 1)."""
    from ftguard.models import load_model

    base = load_model(name, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code, revision=revision)
    found = dict(base.named_modules())
    missing = [n for n in modules if n not in found or not hasattr(found[n], "weight")]
    if missing:
        raise FtguardError(
            f"asft: the base model '{name}' has no module {missing[0]} (another architecture?)"
        )
    return {n: found[n].weight.detach().to("cpu", torch.float32, copy=True) for n in modules}


# ---------------------------------------------------------------------------------------------- the trainer


@dataclass
class _Anchor:
    factor: torch.Tensor  # F, with C = F Fᵀ
    params: tuple[nn.Parameter, ...]  # (B, A) of the LoRA, or (W,)
    start: tuple[torch.Tensor, ...] | None  # (B₀, A₀) of a non-fresh LoRA, (W₀,) in full, None when B₀ = 0


class AsftTrainer(FtguardTrainer):
    """Each micro-batch: ℓ (the SFT loss) + λ·R, R = Σ_i ‖(I − C_i)·ΔW_i‖²_F over the regularised modules.

    C_i comes from V_i = (the module's weight when the trainer is created, i.e. at the start of the stage, before
    a resume loads its checkpoint) − ``base_weights[i]``; nothing needs saving, as a resumed run rebuilds the same
    start. The term depends on the weights only: its gradient joins ℓ's in the one backward (DDP averages
    identical copies). Cost: a few [out × k]·[k × r] products per module, ≈ 1× SFT. Logged: asft_penalty (λ·R),
    asft_orthogonal (R).
    """

    def __init__(self, *args: Any, base_weights: dict[str, torch.Tensor], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg: AsftConfig = self.method_config
        self.anchors: dict[str, _Anchor] = {}
        unaligned = []
        for name, module in regularised_modules(self.model, list(base_weights)).items():
            anchor, w_start = self._anchor(module)
            if w_start.shape != base_weights[name].shape:
                raise FtguardError(
                    f"asft: '{name}' is {tuple(w_start.shape)} but {tuple(base_weights[name].shape)} in the base"
                )
            with torch.no_grad():
                anchor.factor = alignment_factor(
                    w_start - base_weights[name].to(w_start.device), cfg.projection
                )
            if anchor.factor.shape[1] == 0:
                unaligned.append(name)
            self.anchors[name] = anchor
        if unaligned:
            log.warning(
                "asft: the alignment did not change %d of %d modules (e.g. %s): C = 0 there, so their whole update "
                "is penalised as orthogonal",
                len(unaligned),
                len(self.anchors),
                unaligned[0],
            )

    @staticmethod
    def _anchor(module: nn.Module) -> tuple[_Anchor, torch.Tensor]:
        """The module's parameters and start, and its weight at the start of the stage (float32)."""
        with torch.no_grad():
            if not hasattr(module, "lora_A"):
                w = module.weight
                return _Anchor(torch.empty(0), (w,), (w.detach().float().clone(),)), w.detach().float()
            adapter = module.active_adapters[0]
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            product = b.detach().float() @ a.detach().float()
            start = (b.detach().float().clone(), a.detach().float().clone()) if product.any() else None
            w = module.base_layer.weight.detach().float() + module.scaling[adapter] * product
            return _Anchor(torch.empty(0), (b, a), start), w

    def orthogonal(self) -> torch.Tensor:
        """R = Σ_i ‖(I − C_i)·ΔW_i‖²_F at the current weights, float32, differentiable."""
        total = None
        for anchor in self.anchors.values():
            first = anchor.params[0]
            if anchor.factor.device != first.device:  # the model was moved after the trainer was created
                anchor.factor = anchor.factor.to(first.device)
                anchor.start = tuple(t.to(first.device) for t in anchor.start) if anchor.start else None
            with torch.autocast(first.device.type, enabled=False):
                if len(anchor.params) == 1:  # full: ΔW = W − W₀
                    term = orthogonal_sq(anchor.factor, first.float() - anchor.start[0])
                else:  # LoRA: ΔW = BA − B₀A₀ = [B, B₀]·[A; −A₀]
                    b, a = (p.float() for p in anchor.params)
                    if anchor.start is not None:
                        b, a = torch.cat([b, anchor.start[0]], 1), torch.cat([a, -anchor.start[1]], 0)
                    term = orthogonal_sq(anchor.factor, b, a)
            total = term if total is None else total + term.to(total.device)
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg: AsftConfig = self.method_config
        if not model.training or cfg.lam == 0:  # evaluation, and λ = 0, are plain SFT
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        ce, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        orth = self.orthogonal()
        penalty = cfg.lam * orth
        loss = ce + self.scale_extra(penalty, num_items_in_batch).to(ce.device)
        self.record(asft_penalty=penalty, asft_orthogonal=orth)
        return (loss, outputs) if return_outputs else loss


# ---------------------------------------------------------------------------------------------- the method


@register_method
class Asft(Method):
    """Fine-tuning with a penalty on the part of the update orthogonal to the alignment direction
    V = W_aligned − W_base, which keeps the model in the "narrow safety basin" along V."""

    name = "asft"
    # One SFT pass plus [out × k]·[k × r] products per module: ≈ 1×. Bench on tiny: 0.97× (its base is its
    # model, so V = 0 and k = 0), 1.06× with a full-rank V (k = out). Memory: F in float32, ≤ one copy of the
    # regularised weights.
    pass_factor = 1.0
    stages = ("finetune",)
    paper = (
        "Yang et al., AsFT: Anchoring Safety During LLM Fine-Tuning Within Narrow Safety Basin, AAAI 2026 "
        "(arXiv:2506.08473)"
    )
    summary = "fine-tune with ℓ + λ·Σ ‖(I − C)·ΔW‖²_F, C = VVᵀ/‖V‖_F from V = aligned − base weights; ≈1× SFT"
    config_class, trainer_class = AsftConfig, AsftTrainer
    preferred_topology = "double"  # the authors train a fresh LoRA on the aligned (chat) model
    unsupported_modes: ClassVar[dict[str, str]] = {
        mode: f"its penalty reads whole weight matrices (LoRA B and A, or W) outside the forward, and {label} "
        "shards them"
        for mode, label in (("fsdp", "FSDP"), ("deepspeed_zero3", "ZeRO-3"))
    }

    def check_run_config(self, run: RunConfig, stage: str) -> None:
        check(
            run.align is not None or self.config.base_model is not None,
            f"{stage}.args.base_model",
            "is required when align is null: name the model before alignment (e.g. the pretrained base of a "
            "chat model), as asft regularises against aligned − base weights",
        )

    def extra_cost(self, run: RunConfig, stage: str) -> ExtraCost:
        return ExtraCost(
            notes=["asft: one load of the pre-alignment model and one SVD per regularised matrix"]
        )

    def create_trainer(self, ctx: StageContext, **trainer_kwargs: Any) -> AsftTrainer:
        cfg, run = self.config, ctx.run
        targets = cfg.target_modules
        if targets is None and run.adapter.trains_full("finetune"):
            targets = list(run.adapter.finetune.target_modules)
        modules = list(regularised_modules(ctx.model, None if targets is None else list(targets)))
        # The base is what the pipeline evaluates as its "base" point (run.model.name): a pure function of the
        # config, already part of this unit's fingerprint; an explicit base_model enters it through the args.
        name, revision = (
            (cfg.base_model, None) if cfg.base_model is not None else (run.model.name, run.model.revision)
        )
        base = load_base_weights(name, modules, run.model, revision)
        return AsftTrainer(
            method_config=cfg, aux_datasets=self.extra_datasets(ctx), base_weights=base, **trainer_kwargs
        )
