"""SMART: smoothness-inducing adversarial regularisation plus a Bregman proximal point term, in the fine-tuning
stage (Jiang, He, Chen, Liu, Gao, Zhao, "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language
Models through Principled Regularized Optimization", ACL 2020; docs/methods.md, SMART).

What the authors' code does (``namisan/mt-dnn``: ``mt_dnn/perturbation.py`` ``SmartPerturbation``,
``mt_dnn/loss.py``, ``mt_dnn/model.py``, ``train.py``), with x the input embeddings and f the logits:

1. δ₀ = σ·N(0, I) on every embedding position (``generate_noise``; ``--adv_noise_var`` is used as a std).
2. K times: g = ∇_δ stable_kl(f(x + δ), sg f(x)), a sum over the batch; δ ← n(δ + η·g) with n(v) = v /
   (‖v‖ + ε_n), ‖·‖ the ℓ∞ norm of each token's vector (``--adv_p_norm inf``, ``--adv_norm_level 0``; the ℓ2 norm,
   or the sign for "l1", as options). This is a normalisation, not the paper's projection onto an ε-ball: δ ends
   with ℓ∞ norm ≈ 1 per token whatever σ and η are. ``stable_kl`` is 2·Σ p(r(p) − r(q)), p the perturbed and q
   the clean distribution, r(p) = −log(1/(p + 1e-6) − 1 + 1e-6) ≈ log-odds, r detached.
3. Loss += λ_s·SymKL, ``SymKlCriterion(f(x), f(x + δ))`` = KL(sg p_δ ‖ p) + KL(sg p ‖ p_δ), "batchmean".

The Bregman proximal point step is not in the public code; it follows the paper's Algorithm 1 with S = 1:
loss += μ·SymKL(f_θ(x), f_θ̃(x)) and, after each optimizer step t, θ̃ ← β_t·θ̃ + (1 − β_t)·θ, θ̃ starting at the
start-of-stage weights; β_t = 0.99 for t ≤ 0.1·T and 0.999 after (paper §5).

Adaptations to a causal LM, and differences from the authors' code (docs/methods.md, SMART):

* f(x) is the next-token distribution at each **response position** (labels ≠ −100, shifted as the CE is). The
  inner objective sums over those positions (the original's sum over the batch, so η·g does not depend on the
  batch size); both SymKL terms are averaged over them ("batchmean" with one instance per predicted token, as
  the SFT loss is a per-token mean), so λ_s = μ = 1 weigh them like the paper's per-example terms. Gradient
  accumulation averages the terms over micro-batches (``scale_extra``).
* x is the token embedding the model itself would look up, fed back through ``inputs_embeds``. The original
  takes BERT's embedding-layer output (position/type embeddings and LayerNorm applied) and passes it as
  ``inputs_embeds``, which BERT embeds again; with Llama-style models (no learned positions) f(x + 0) = f(x).
* A non-finite inner gradient skips the adversarial term for that micro-batch (logged as smart_adv_skipped),
  which is what the original's ``return 0`` meant (its caller then fails unpacking the 0).
* ``norm_p`` "l2"/"l1" and ``norm_level: sequence`` work (in the original only ℓ∞ per token runs: the others
  reach an unassigned variable).
* θ̃ is a float32 copy of the trainable weights (the LoRA matrices with an adapter), used through
  ``torch.func.functional_call`` without dropout (``training/reference.py``); no second model. The Bregman term's
  gradient is the full one (θ̃ is constant); the adversarial term keeps the original's stop-gradients.
* Every forward of the model runs in train mode (dropout on), as the original; the anchor forward does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.registry import register_method
from ftguard.schema import check
from ftguard.training.reference import ReferenceModel, unwrap_parallel
from ftguard.training.trainer import FtguardTrainer

IGNORE = -100


@dataclass
class SmartConfig:
    # mt-dnn train.py --adv_alpha 1 (the paper tunes λ_s ∈ {1, 3, 5}).
    lambda_s: float = field(default=1.0, metadata={"help": "λ_s, weight of SymKL(f(x), f(x + δ))"})
    # Paper §5: μ = 1.
    mu: float = field(
        default=1.0, metadata={"help": "μ, weight of the Bregman term SymKL(f_θ(x), f_θ̃(x)); 0 = off"}
    )
    # mt-dnn --adv_k 1; paper T_x̃ = 1.
    adv_steps: int = field(default=1, metadata={"help": "K, ascent steps on δ (0 = the random start only)"})
    # Paper §5 and SmartPerturbation's default η = 1e-3 (train.py's --adv_step_size default is 1e-5).
    step_size: float = field(default=1e-3, metadata={"help": "η: δ ← n(δ + η·∇_δ)"})
    # mt-dnn --adv_noise_var 1e-5, used as the std of the start; paper σ = 1e-5.
    noise_std: float = field(default=1e-5, metadata={"help": "σ, std of the random start of δ"})
    # mt-dnn --adv_p_norm inf, --adv_norm_level 0, --adv_epsilon 1e-6.
    norm_p: Literal["inf", "l2", "l1"] = field(
        default="inf",
        metadata={"help": "n(v): v / (‖v‖_∞ + ε_n), v / (‖v‖_2 + ε_n) or sign(v) ('l1', as the original)"},
    )
    norm_level: Literal["token", "sequence"] = field(
        default="token", metadata={"help": "the norm of n(v) over each token's vector or each sequence's"}
    )
    norm_eps: float = field(default=1e-6, metadata={"help": "ε_n in the normalisation's denominator"})
    # Paper §5: β = 0.99 for the first 10% of the updates, 0.999 after.
    beta: float = field(default=0.99, metadata={"help": "momentum β of θ̃ for steps t ≤ beta_switch·T"})
    beta_late: float = field(default=0.999, metadata={"help": "momentum β of θ̃ for steps t > beta_switch·T"})
    beta_switch: float = field(default=0.1, metadata={"help": "share of the steps that use beta"})

    def __post_init__(self) -> None:
        for key in ("lambda_s", "mu", "step_size"):
            value = getattr(self, key)
            check(math.isfinite(value) and value >= 0, key, f"must be a finite number ≥ 0, got {value}")
        for key in ("noise_std", "norm_eps"):
            value = getattr(self, key)
            check(math.isfinite(value) and value > 0, key, f"must be a finite number > 0, got {value}")
        check(self.adv_steps >= 0, "adv_steps", f"must be ≥ 0, got {self.adv_steps}")
        for key in ("beta", "beta_late", "beta_switch"):
            value = getattr(self, key)
            check(0 <= value <= 1, key, f"must be in [0, 1], got {value}")


# ------------------------------------------------------------------------------------------- the pieces


def response_positions(inputs: dict[str, Any]) -> torch.Tensor:
    """[B, T − 1] bool: the logits positions whose next token is a response token (as the shifted CE counts)."""
    if "labels" not in inputs:
        raise FtguardError("smart: the batch has no labels, so no response positions to regularise")
    return inputs["labels"][:, 1:] != IGNORE


def _kl(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per row Σ_v p_t (log p_t − log q), ``target`` given as log-probabilities."""
    return (target.exp() * (target - log_q)).sum(-1)


def token_sym_kl(a: torch.Tensor, b: torch.Tensor, *, stop_gradient: bool) -> torch.Tensor:
    """Per row of [N, V] logits, KL(p_b ‖ p_a) + KL(p_a ‖ p_b) in fp32. ``stop_gradient``: the target of each
    direction is detached, as mt-dnn's SymKlCriterion."""
    la, lb = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
    if stop_gradient:
        return _kl(lb.detach(), la) + _kl(la.detach(), lb)
    return _kl(lb, la) + _kl(la, lb)


def stable_kl_sum(perturbed: torch.Tensor, clean: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The original's inner objective ``stable_kl(perturbed, clean, reduce=False)``: 2·Σ p (r(p) − r(q)) over
    every row and class, r the detached, ε-guarded log-odds (the gradient flows through p only)."""
    p = F.softmax(perturbed.float(), -1)
    q = F.softmax(clean.float(), -1)

    def log_odds(x: torch.Tensor) -> torch.Tensor:
        return -torch.log(1.0 / (x + eps) - 1.0 + eps).detach()

    return 2.0 * (p * (log_odds(p) - log_odds(q))).sum()


def normalise(v: torch.Tensor, norm_p: str, level: str, eps: float) -> torch.Tensor:
    """n(v) on [B, T, H]: v over its ℓ∞ or ℓ2 norm (per token or per sequence) plus ε, or sign(v) for 'l1'."""
    if norm_p == "l1":
        return v.sign()
    dims = (-1,) if level == "token" else (-2, -1)
    if norm_p == "l2":
        norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    else:
        norm = v.abs().amax(dim=dims, keepdim=True)
    return v / (norm + eps)


def ascend(forward, embed: torch.Tensor, noise: torch.Tensor, clean: torch.Tensor, cfg: SmartConfig):
    """δ after ``cfg.adv_steps`` steps from ``noise``: δ ← n(δ + η·∇_δ stable_kl(forward(x + δ), clean)).

    ``forward`` maps [B, T, H] input embeddings to the logits at the counted positions; ``clean`` is f(x) there.
    None if a gradient is not finite (the original's ``return 0``)."""
    delta, x, clean = noise.detach().float(), embed.detach(), clean.detach()
    for _ in range(cfg.adv_steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(stable_kl_sum(forward(x + delta), clean), delta)
        if not torch.isfinite(grad.norm()):
            return None
        delta = normalise(delta.detach() + cfg.step_size * grad, cfg.norm_p, cfg.norm_level, cfg.norm_eps)
    return delta.detach()


def anchor_beta(step: int, total: int, cfg: SmartConfig) -> float:
    """β_t of the update after optimizer step ``step`` (1-based) of ``total``: the paper's t ≤ 0.1·T rule."""
    return cfg.beta if step <= round(cfg.beta_switch * total, 6) else cfg.beta_late


class ProximalAnchor(ReferenceModel):
    """θ̃ for the Bregman term: a float32 copy of the trainable weights, updated θ̃ ← β·θ̃ + (1 − β)·θ; calling it
    runs the model with θ̃ swapped in (no grad, no dropout; ``ReferenceModel``). fp32, because with bf16 weights
    (1 − β)·(θ − θ̃) at β = 0.999 falls below bf16's resolution and θ̃ would never move."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # θ̃ leaves the start-of-stage weights, so switching a fresh adapter off cannot stand for it.
        self.mode = "snapshot"
        self.params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        self.snapshot = {n: p.detach().float().clone() for n, p in self.params.items()}

    def _weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in self.params.items():
            if self.snapshot[name].device != param.device:  # the model was moved after the capture
                self.snapshot[name] = self.snapshot[name].to(param.device)
            out[name] = self.snapshot[name].to(param.dtype)
        return out

    @torch.no_grad()
    def update(self, beta: float) -> None:
        self._weights()  # same device as the weights
        for name, param in self.params.items():
            self.snapshot[name].lerp_(param.detach().float(), 1.0 - beta)


class _UpdateAnchor(TrainerCallback):
    def __init__(self, trainer: SmartTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.update_anchor()


# ------------------------------------------------------------------------------------------- the trainer


class SmartTrainer(FtguardTrainer):
    """Each micro-batch (x embedded as e, counted positions P = the response positions, N = |P|):

    1. Forward through the model: ℓ = the SFT loss, p = f(x) at P.
    2. If λ_s > 0: δ = ``ascend`` from σ·N(0, I) (K forwards and input-only backwards); p_δ = f(e + δ) at P;
       A = (1/N)·Σ_P [KL(sg p_δ ‖ p) + KL(sg p ‖ p_δ)].
    3. If μ > 0: p̃ = f_θ̃(x) at P (no grad); B = (1/N)·Σ_P [KL(p̃ ‖ p) + KL(p ‖ p̃)].
    4. Loss = ℓ + λ_s·A + μ·B; the Trainer does the backward, GA scaling and the DDP reduce.
    After each optimizer step t: θ̃ ← β_t·θ̃ + (1 − β_t)·θ (a callback).

    Cost with K = 1: two forwards with weight gradients (x, e + δ), one forward with an input-only backward, one
    no-grad forward (θ̃). The extra forwards call the module inside a DDP wrapper: their gradients join the one
    backward of the step. θ̃ is the same on every rank (the weights are). Logged: smart_adversarial (A),
    smart_proximal (B), smart_delta_abs_mean and smart_embed_abs_mean (scale of δ beside that of e; the latter is
    the original's ``emb_val``, while its ``eff_perturb`` is only the gradient's share of δ, not δ), and
    smart_adv_skipped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchor = ProximalAnchor(self.model) if self.method_config.mu > 0 else None
        self.anchor_updates = 0
        if self.anchor is not None:
            self.add_callback(_UpdateAnchor(self))

    def update_anchor(self) -> None:
        if self.anchor is not None:
            self.anchor.update(anchor_beta(self.state.global_step, self.state.max_steps, self.method_config))
            self.anchor_updates += 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation reports the plain SFT loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        cfg: SmartConfig = self.method_config
        ce, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        keep = response_positions(inputs)
        loss = ce
        if bool(keep.any()):
            module = unwrap_parallel(model)
            rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels")}
            clean = outputs.logits[:, :-1][keep]
            if cfg.lambda_s > 0 and (adv := self._adversarial(module, inputs, rest, clean, keep)) is not None:
                loss = loss + self.scale_extra(cfg.lambda_s * adv, num_items_in_batch)
            if self.anchor is not None:
                anchored = self.anchor(**rest, input_ids=inputs["input_ids"], use_cache=False).logits
                prox = token_sym_kl(clean, anchored[:, :-1][keep], stop_gradient=False).mean()
                loss = loss + self.scale_extra(cfg.mu * prox, num_items_in_batch)
                self.record(smart_proximal=prox)
        return (loss, outputs) if return_outputs else loss

    def _adversarial(self, module, inputs, rest, clean, keep) -> torch.Tensor | None:
        """A of step 2, or None (logged) when the ascent met a non-finite gradient."""
        cfg: SmartConfig = self.method_config
        embed = module.get_input_embeddings()(inputs["input_ids"])

        def forward(embeds: torch.Tensor) -> torch.Tensor:
            # In the stream's dtype: exact with fp32 weights under autocast; a bf16 model's stream is bf16.
            out = module(**rest, inputs_embeds=embeds.to(embed.dtype), use_cache=False)
            return out.logits[:, :-1][keep]

        noise = torch.randn(embed.shape, device=embed.device, dtype=torch.float32) * cfg.noise_std
        delta = ascend(forward, embed, noise, clean, cfg)
        self.record(smart_adv_skipped=float(delta is None))
        if delta is None:
            return None
        adv = token_sym_kl(clean, forward(embed + delta), stop_gradient=True).mean()
        self.record(
            smart_adversarial=adv,
            smart_delta_abs_mean=delta.abs().mean(),
            smart_embed_abs_mean=embed.detach().abs().float().mean(),
        )
        return adv

    # ------------------------------------------------------------------ checkpoint state

    def method_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.anchor is None:
            return {}, {}
        tensors = {f"anchor/{n}": t for n, t in self.anchor.snapshot.items()}
        return {"smart_anchor_updates": self.anchor_updates}, tensors

    def load_method_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if self.anchor is None or not values:
            return
        saved = {k.removeprefix("anchor/"): v for k, v in tensors.items() if k.startswith("anchor/")}
        if set(saved) != set(self.anchor.snapshot):
            raise FtguardError(
                "smart: the checkpoint's anchor θ̃ does not match this model's trainable parameters (changed "
                "adapter or topology?): delete the stage's checkpoints folder and rerun the stage"
            )
        self.anchor.snapshot = {n: t.float() for n, t in saved.items()}
        self.anchor_updates = int(values.get("smart_anchor_updates", 0))


@register_method
class Smart(Method):
    """SMART in the fine-tuning stage (docs/methods.md, SMART): the user's fine-tune with a smoothness-inducing
    adversarial term on the input embeddings and a Bregman proximal term toward a momentum average of the
    weights, so the model moves little and smoothly from where the stage started."""

    name = "smart"
    # K = 1 with LoRA: 2F+2B (x, e + δ) + F + an input-only B (the ascent) + F (θ̃) = 7F over SFT's 2F.
    # Bench on the tiny model 4.1–4.6× (KL 2.3× there: the vocabulary-wide fp32 softmaxes weigh more).
    pass_factor = 3.5
    stages = ("finetune",)
    paper = (
        "Jiang et al., SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language Models through "
        "Principled Regularized Optimization, ACL 2020 (namisan/mt-dnn SmartPerturbation)"
    )
    summary = (
        "fine-tune with ℓ + λ_s·SymKL(f(x), f(x + δ)), δ from K normalised ascent steps on the input embeddings, "
        "+ μ·SymKL(f_θ(x), f_θ̃(x)), θ̃ a momentum average of the weights; ≈3.5× SFT per step"
    )
    config_class, trainer_class = SmartConfig, SmartTrainer
    unsupported_modes = {
        mode: "it runs the unwrapped model (the embedding lookup, the perturbed forwards, the anchor weights "
        f"swapped in) outside the {label} wrapper, which gathers the sharded weights only for its own forward"
        for mode, label in (("fsdp", "FSDP"), ("deepspeed_zero3", "ZeRO-3"))
    }
    # The paper fine-tunes every weight; left to the run's topology (default double, as KL and LDIFS).
    preferred_topology = None
