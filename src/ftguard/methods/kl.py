"""KL: fine-tuning with a KL penalty toward the model at the start of fine-tuning, as the Vaccine repo's
baseline (docs/methods.md, KL).

What the original does (``git-disl/Vaccine`` ``trainer.py`` ``KLTrainer``, ``script/KL_finetune/*.sh``): the
teacher is the state dict captured when the trainer is created; each step it loads that state dict into the
model, runs the teacher forward, loads the trained weights back, runs a separate student forward, and then
``compute_loss`` runs a third forward for the CE. The penalty is
``λ·KLDivLoss(reduction="batchmean")(log_softmax(student_logits, dim=1), softmax(teacher_logits, dim=1))`` on
the [batch, tokens, vocab] logits: KL(teacher‖student) summed over every position (prompt, response and padding)
and divided by the batch size; λ = 0.1 (``--lamb``).

Differences, each because the original is a bug (docs/methods.md, Original-code bugs #4) or a needless cost:

* The softmax is over the **vocabulary** (the original's ``dim=1`` is the sequence axis, which compares how
  each token's logit is spread over positions, not next-token distributions). The reduction is kept: the
  per-position KL summed over the counted positions, divided by the number of sequences (a per-sequence KL).
* The teacher is not reloaded: the same model with the fresh adapter disabled, or a snapshot of the trainable
  weights (``training/reference.py``); it runs without dropout.
* One student forward gives both the CE and the KL (the original ran two, which with LoRA dropout > 0 saw
  different dropout masks): 2 forwards per step instead of 3.
* Padding positions do not count by default; ``include_padding: true`` reproduces the original's positions.
* Log-probabilities are computed in fp32; gradient accumulation averages the term over micro-batches like the CE.

``mode: original`` is the bug-compatible term, for reproducing the numbers Vaccine's Table 1 reports for KL:
the softmax over the sequence axis (dim 1) of the whole [batch, tokens, vocab] logits, every position counted
(padding included, so include_padding does not apply), "batchmean". It is a different regulariser, not a
rescaled one, and of another size: a λ does not carry over between the modes (docs/methods.md, Original-code
bugs #4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ftguard.methods.base import Method
from ftguard.methods.registry import register_method
from ftguard.schema import check
from ftguard.training.reference import REFERENCE_UNSUPPORTED_MODES, ReferenceTrainer


@dataclass
class KlConfig:
    # docs/methods.md, KL: Vaccine's KL_finetune/*.sh use lamb=0.1.
    lam: float = field(
        default=0.1,
        metadata={"help": "λ, weight of KL(start-of-stage model ‖ model) per sequence (Vaccine's --lamb)"},
    )
    include_padding: bool = field(
        default=False, metadata={"help": "count padding positions in the KL too (the original does)"}
    )
    mode: Literal["vocabulary", "original"] = field(
        default="vocabulary",
        metadata={
            "help": "'vocabulary': KL of next-token distributions; 'original': the Vaccine repository's term, "
            "softmax over the sequence axis, every position (bug-compatible; docs/methods.md)"
        },
    )

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.lam) and self.lam >= 0, "lam", f"must be a finite number ≥ 0, got {self.lam}"
        )


def sequence_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Σ over kept positions of KL(softmax(teacher) ‖ softmax(student)) over the vocabulary, divided by the batch
    size (the original's "batchmean"), in fp32. ``keep`` is [B, T] bool."""
    student = F.log_softmax(student_logits[keep].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[keep].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") / keep.shape[0]


def original_sequence_axis_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The Vaccine repository's term: ``KLDivLoss("batchmean")(log_softmax(s, dim=1), softmax(t, dim=1))`` on the
    [B, T, V] logits, i.e. for each (sequence, vocabulary entry) a distribution over the positions; fp32."""
    student = F.log_softmax(student_logits.float(), dim=1)
    teacher = F.log_softmax(teacher_logits.float(), dim=1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") / student_logits.shape[0]


class KlTrainer(ReferenceTrainer):
    """Each micro-batch x, with the teacher t = the model at the start of the stage:

    1. Forward x through the model: ℓ = the SFT loss, and its logits.
    2. Forward x through t (no grad): the teacher's logits.
    3. K = Σ_{counted positions} KL(t's next-token distribution ‖ the model's) / batch size.
    4. Loss = ℓ + λ·K; the Trainer does the backward, GA scaling and the DDP reduce.

    One forward and one backward of the model plus one forward of the teacher per micro-batch (≈ 1.5× SFT with
    LoRA; docs/methods.md, Cost per step). Logged: kl_divergence (K).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation reports the plain SFT loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        cfg: KlConfig = self.method_config

        # 1. The model (student).
        ce, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        # 2. The teacher on the same inputs.
        teacher_logits = self.reference(**self.reference_inputs(inputs)).logits
        # 3. Per-sequence KL over the vocabulary at the counted positions (or the original's sequence-axis term).
        if cfg.mode == "original":
            kl = original_sequence_axis_kl(outputs.logits, teacher_logits)
        else:
            kl = sequence_kl(outputs.logits, teacher_logits, self.positions(inputs, cfg.include_padding))
        # 4. Combine.
        loss = ce + self.scale_extra(cfg.lam * kl, num_items_in_batch)
        self.record(kl_divergence=kl)
        return (loss, outputs) if return_outputs else loss


@register_method
class Kl(Method):
    """KL regularisation in the fine-tuning stage (docs/methods.md, KL): keep the model's next-token
    distributions on the user's data close to those of the model at the start of fine-tuning (the aligned
    model)."""

    name = "kl"
    # The same extra forward (the teacher). Bench 1.82× (the vocabulary-wide fp32 log-softmax, small at 7B).
    pass_factor = 1.5
    stages = ("finetune",)
    paper = "KL-regularised fine-tuning, the baseline of Huang et al., Vaccine (NeurIPS 2024), git-disl/Vaccine KLTrainer"
    summary = "fine-tune with ℓ + λ·KL(start-of-stage model ‖ model) over the vocabulary; 2F+1B per step"
    config_class, trainer_class = KlConfig, KlTrainer
    unsupported_modes = REFERENCE_UNSUPPORTED_MODES
    preferred_topology = "double"  # Vaccine's KL script trains a fresh LoRA (docs/methods.md, KL)
