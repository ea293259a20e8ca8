"""LDIFS: ℓ2 distance in feature space to the model at the start of fine-tuning, as the Booster repo's
baseline (Mukhoti et al., 2024; docs/methods.md, LDIFS).

What the original does (``git-disl/Booster`` ``trainer.py`` ``LDIFSTrainer``, scripts ``LDIFS_*.sh``): forward
hooks on every ``model.layers.{i}.mlp``; per layer, (ρ/2)·‖MLP output − reference MLP output‖² with the norm over
the whole [batch, tokens, hidden] tensor, i.e. a **sum** (not a mean) over batch rows, token positions and
features, every position counted (prompt, response and padding); the reference is a deep copy of the model made
when the trainer is created (eval mode) and run on the same input ids and attention mask; ρ = 1e-4.

Differences, each because the original is a bug, a defect or a needless cost; none changes the objective:

* Reference without a second model: the same model with the fresh adapter disabled (double topology), or a
  snapshot of the trainable weights only (``training/reference.py``); the reference forward stops after the
  last MLP (its logits are never used). Exact either way.
* No silent per-layer dropping: the original adds a layer's term only if it is < 0.1, a workaround for
  NaN/overflow that also silently switches the regulariser off for exactly the layers that drifted most (with
  ρ = 1e-4 that is ‖Δ_l‖² ≥ 2000, a mean squared change of only ~5e-4 per feature at batch 5 × 200 tokens × 4096
  for Llama-2-7B, so the published numbers may come from a much weaker regulariser). Here every layer always
  counts, in fp32, and a non-finite distance stops the run with an error naming the step. To reproduce the
  original, set ``drop_layer_terms_above: 0.1``: terms at or above it (and NaN) are dropped and counted in the
  log as ldifs_layers_dropped.
* Padding positions do not count by default (their "features" depend on how much padding a batch happens to
  have); ``include_padding: true`` reproduces the original.
* "Clip at 5": the original calls ``clip_grad_norm_(…, 5)`` after each backward, then the Trainer clips the
  same gradient at its default 1.0. Clipping to 5 then to 1 keeps the direction and gives norm min(‖g‖, 1), the
  same as clipping at 1 alone (with accumulation > 1 it would clip partial sums, a bug). It is not repeated:
  the Trainer's ``train.max_grad_norm`` (1.0; docs/methods.md, Training defaults) is the clip.
* Gradient accumulation: the term is per micro-batch and is averaged over the micro-batches like the CE (the
  original, with accumulation 1 in every script, never scaled it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.registry import register_method
from ftguard.schema import check
from ftguard.training.hooks import decoder_parts
from ftguard.training.reference import REFERENCE_UNSUPPORTED_MODES, ReferenceTrainer


@dataclass
class LdifsConfig:
    # docs/methods.md, LDIFS: Booster's LDIFS_*.sh use RHO=0.0001.
    rho: float = field(
        default=1e-4,
        metadata={"help": "ρ: the loss adds (ρ/2)·Σ_layers Σ_tokens ‖MLP output − reference‖²"},
    )
    include_padding: bool = field(
        default=False, metadata={"help": "count padding positions in the distance too (the original does)"}
    )

    # The original's NaN workaround (see the module docstring), off by default; 0.1 reproduces it.
    drop_layer_terms_above: float | None = field(
        default=None,
        metadata={
            "help": "if set, a layer's term (ρ/2)·‖Δ_l‖² counts only when below this value, as the original's "
            "workaround (0.1); null = every layer counts and a non-finite distance is an error"
        },
    )

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.rho) and self.rho >= 0, "rho", f"must be a finite number ≥ 0, got {self.rho}"
        )
        check(
            self.drop_layer_terms_above is None or self.drop_layer_terms_above > 0,
            "drop_layer_terms_above",
            f"must be > 0 or null, got {self.drop_layer_terms_above}",
        )


class _ReferenceDone(Exception):
    """Raised by the last MLP's hook to end the reference forward: nothing after it is used."""


@contextmanager
def capture_outputs(
    modules: Sequence[nn.Module], *, stop_after_last: bool = False
) -> Iterator[list[torch.Tensor | None]]:
    """Record each module's output on the forward inside the block (the list is filled in module order)."""
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(i: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[i] = output[0] if isinstance(output, tuple) else output
            if stop_after_last and i == len(modules) - 1:
                raise _ReferenceDone

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        yield captured
    except _ReferenceDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if any(c is None for c in captured):
        raise FtguardError(
            "ldifs: an MLP forward hook did not fire; the model runs its decoder layers unusually"
        )


class LdifsTrainer(ReferenceTrainer):
    """Each micro-batch x, with the reference r = the model at the start of the stage:

    1. Forward x through the model (graph kept), recording every decoder layer's MLP output a_l: ℓ = the SFT loss.
    2. Forward x through r (no grad), recording its MLP outputs a_l^r; stop after the last MLP.
    3. D = Σ_l Σ_{counted positions} ‖a_l − a_l^r‖² (fp32); a non-finite D is an error.
    4. Loss = ℓ + (ρ/2)·D; the Trainer does the backward, GA scaling and the DDP reduce.

    One forward and one backward of the model plus one forward of the reference per micro-batch (≈ 1.5× SFT with
    LoRA; docs/methods.md, Cost per step). Logged: ldifs_distance (D), ldifs_penalty ((ρ/2)·D), and with the
    original's filter on, ldifs_layers_dropped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mlps = decoder_parts(self.model, "ldifs")[
            0
        ]  # fails before any training on a non-Llama-like layout

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation reports the plain SFT loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        cfg: LdifsConfig = self.method_config

        # 1. The model: SFT loss and MLP outputs.
        with capture_outputs(self.mlps) as student:
            ce, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if torch.is_grad_enabled() and not any(a.requires_grad for a in student):
            raise FtguardError(
                "ldifs: the MLP outputs carry no gradient (reentrant gradient checkpointing?); use the default "
                "non-reentrant checkpointing or turn train.gradient_checkpointing off"
            )

        # 2. The reference on the same inputs.
        with capture_outputs(self.mlps, stop_after_last=True) as reference:
            self.reference(**self.reference_inputs(inputs))

        # 3. Squared feature distance, layer by layer, over the counted positions.
        keep = self.positions(inputs, cfg.include_padding).unsqueeze(-1)
        per_layer = [
            ((a.float() - r.float()) * keep).pow(2).sum() for a, r in zip(student, reference, strict=True)
        ]
        if cfg.drop_layer_terms_above is not None:
            # The original's filter: `term < cap` is False for NaN, so non-finite layers are dropped too. Dropped
            # terms leave the graph entirely (a zero weight would still turn an inf into a NaN gradient).
            values = (cfg.rho / 2 * torch.stack(per_layer).detach()).tolist()
            kept = [d for d, v in zip(per_layer, values, strict=True) if v < cfg.drop_layer_terms_above]
            self.record(ldifs_layers_dropped=len(per_layer) - len(kept))
            per_layer = kept or [torch.zeros((), device=keep.device)]
        per_layer = torch.stack(per_layer)
        distance = per_layer.sum()
        if not torch.isfinite(distance):
            bad = [i for i, d in enumerate(per_layer.tolist()) if not math.isfinite(d)] or "sum"
            raise FtguardError(
                f"ldifs: the feature distance to the start-of-stage model is not finite at step {self.state.global_step + 1} "
                f"(layers {bad}): the model diverged or its activations overflow; lower train.learning_rate or "
                f"args.rho (now {cfg.rho}), or train without mixed precision (train.mixed_precision: no)"
            )

        # 4. Combine.
        penalty = cfg.rho / 2 * distance
        loss = ce + self.scale_extra(penalty, num_items_in_batch)
        self.record(ldifs_distance=distance, ldifs_penalty=penalty)
        return (loss, outputs) if return_outputs else loss


@register_method
class Ldifs(Method):
    """Feature-space regularisation in the fine-tuning stage (docs/methods.md, LDIFS): keep every layer's MLP
    output on the user's data close to what the model at the start of fine-tuning (the aligned
    model) produced."""

    name = "ldifs"
    # One extra forward with the adapters disabled (2F + F over 2F). Bench 1.23×.
    pass_factor = 1.5
    stages = ("finetune",)
    paper = (
        "Mukhoti et al., Fine-tuning can cripple your foundation model; preserving features may be the solution, "
        "TMLR 2024 (LDIFS), as the Booster repo's baseline"
    )
    summary = "fine-tune with ℓ + (ρ/2)·Σ_l ‖MLP output_l − start-of-stage MLP output_l‖²; 2F+1B per step"
    config_class, trainer_class = LdifsConfig, LdifsTrainer
    unsupported_modes = REFERENCE_UNSUPPORTED_MODES
    preferred_topology = "double"  # as Booster's baselines (docs/methods.md, Adapter topologies)
