"""Vlguard / SafeInstr in the fine-tuning stage: safety (refusal) samples mixed into the user's data
(docs/methods.md, Vlguard), in two registered forms sharing the safety-data handling:

* ``vlguard``: data mixing only, as Vaccine's and Lisa's baseline (``--optimizer vlguard``, a plain Trainer on
  the mixed set). Vaccine adds ``guide_data_num`` samples on top of the n user samples; Lisa replaces that many
  benign ones (``mode: add | replace``).
* ``vlguard_reg``: the regularised form of the Booster repo's baseline (``VlguardTrainer``): every step
  ℓ + λ·f, f the CE on a random batch of 4 refusal samples, λ = 0.1.

The safety samples are the first ones of the plan's alignment set (the originals take the first BeaverTails
``is_safe`` rows, i.e. the start of their own alignment data), or of ``safety_source`` when one is configured.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ftguard.config import SourceConfig
from ftguard.cost import ExtraCost
from ftguard.data.example import Example
from ftguard.data.mix import check_disjoint
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

EXTRA_NAME = "vlguard_safety"  # the plan.extra set loaded from safety_source
SAFETY_STREAM = "safety"

_SOURCE_HELP = (
    "where the safety (prompt → refusal) samples come from; null = the run's alignment set (data.alignment). A "
    "source is deduplicated and checked disjoint from the attack and evaluation prompts"
)


@dataclass
class VlguardConfig:
    # Vaccine train.py: --guide_data_num default 100 (its vlguard script passes it positionally, no value given);
    # Lisa train.py: default 10000, which with its replace rule would leave no benign sample at n = 5000.
    safety_samples: int = field(
        default=100,
        metadata={
            "help": "number of safety samples mixed in (Vaccine/Lisa guide_data_num; Vaccine default 100)"
        },
    )
    mode: Literal["add", "replace"] = field(
        default="add",
        metadata={
            "help": "add = on top of the n user samples (Vaccine); replace = in place of as many benign "
            "samples (Lisa), so the upload keeps n samples"
        },
    )
    safety_source: SourceConfig | None = field(default=None, metadata={"help": _SOURCE_HELP})

    def __post_init__(self) -> None:
        check(self.safety_samples >= 1, "safety_samples", f"must be ≥ 1, got {self.safety_samples}")


@dataclass
class VlguardRegConfig:
    # Booster script/finetune/united/vlguard_lamb.sh: lamb=${1:-0.1}, lr 1e-4 constant; trainer.py VlguardTrainer
    # draws the refusal batch from a RandomSampler with a hard-coded batch size of 4.
    lam: float = field(
        default=0.1, metadata={"help": "λ, weight of the refusal loss f (0.1 in Booster's script)"}
    )
    safety_batch_size: int = field(
        default=4,
        metadata={"help": "refusal batch size per step and device (hard-coded 4 in Booster's trainer)"},
    )
    safety_samples: int | None = field(
        default=None,
        metadata={
            "help": "first N safety samples form the refusal pool; null = all (Booster: good_sample_num, 2000 in "
            "its script, 1000 in train.py)"
        },
    )
    safety_source: SourceConfig | None = field(default=None, metadata={"help": _SOURCE_HELP})

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.lam) and self.lam >= 0, "lam", f"must be a finite number ≥ 0, got {self.lam}"
        )
        check(self.safety_batch_size >= 1, "safety_batch_size", f"must be ≥ 1, got {self.safety_batch_size}")
        check(
            self.safety_samples is None or self.safety_samples >= 1,
            "safety_samples",
            f"must be ≥ 1 or null, got {self.safety_samples}",
        )


# ----------------------------------------------------------------------------------------- safety data


def _source_key(stage: str) -> str:
    return f"{stage}.args.safety_source"


def _load_safety(method: Method, plan: DataPlan, run: RunConfig, stage: str) -> None:
    """Checks (and loads) the safety pool before any work; used by both forms' ``prepare_data``."""
    spec: SourceConfig | None = method.config.safety_source
    if spec is None:
        plan.require(("alignment",), f"{stage}.method '{method.name}'")
        return
    examples = plan.load_extra(EXTRA_NAME, spec, _source_key(stage))
    if any(not ex.output for ex in examples):
        raise FtguardError(
            f"{_source_key(stage)}: {spec.source}/{spec.split} has samples without a response: set its response "
            "(e.g. response: safe for beavertails_refusals) to the refusal field"
        )


def _safety_pool(method: Method, plan: DataPlan) -> tuple[list[Example], str]:
    if method.config.safety_source is None:
        return plan.alignment, "data.alignment"
    if EXTRA_NAME not in plan.extra:
        raise FtguardError(
            f"{method.name}: safety_source was not loaded into the data plan (prepare_data not run)"
        )
    return plan.extra[EXTRA_NAME], "args.safety_source"


def mix_safety_samples(
    examples: list[Example],
    safety_pool: list[Example],
    attack: list[Example],
    *,
    count: int,
    mode: str,
    seed: int,
) -> tuple[list[Example], dict[str, Any]]:
    """The user's samples with ``count`` safety samples added (``add``) or put in place of as many benign ones
    (``replace``; benign = not an attack prompt), shuffled by ``seed``.

    The safety samples are the first ``count`` distinct prompts of the pool that are not already in the upload;
    the benign samples replaced are a seeded random choice (Lisa drops the last ones of its benign file, which
    our mix, already shuffled, no longer orders).
    """
    present = {ex.prompt_key for ex in examples}
    seen: set[str] = set()
    candidates = []
    for ex in safety_pool:
        if ex.prompt_key not in present and ex.prompt_key not in seen:
            seen.add(ex.prompt_key)
            candidates.append(ex)
    if count > len(candidates):
        raise FtguardError(
            f"vlguard asks for {count} safety samples but the safety set has {len(candidates)} distinct prompts not "
            "already in the upload: lower safety_samples or use a larger safety set"
        )
    safety = candidates[:count]
    rng = random.Random(seed)
    kept, replaced = list(examples), 0
    if mode == "replace":
        attack_keys = {ex.prompt_key for ex in attack}
        benign = [i for i, ex in enumerate(examples) if ex.prompt_key not in attack_keys]
        if count > len(benign):
            raise FtguardError(
                f"vlguard mode replace would replace {count} benign samples but the upload has {len(benign)}: lower "
                "safety_samples, raise data.finetune.n, or use mode: add"
            )
        drop = set(rng.sample(benign, count))
        kept = [ex for i, ex in enumerate(examples) if i not in drop]
        replaced = count
    mixed = kept + safety
    # The Trainer's sampler shuffles anyway; this keeps the safety rows from clustering for one that does not.
    rng.shuffle(mixed)
    report = {
        "mode": mode,
        "added": len(safety),
        "replaced": replaced,
        "n_before": len(examples),
        "n_after": len(mixed),
        "seed": seed,
    }
    return mixed, report


# ----------------------------------------------------------------------------------------- data mixing


@register_method
class Vlguard(Method):
    """Vlguard / SafeInstr by data mixing (docs/methods.md, Vlguard): SFT on the upload and safety samples."""

    name = "vlguard"
    # Data mixing only; in `add` mode extra_cost counts the added safety samples as data.
    pass_factor = 1.0
    stages = ("finetune",)
    paper = "Zong et al., Safety Fine-Tuning at (Almost) No Cost: A Baseline for Vision Large Language Models (VLGuard), ICML 2024 (as Vaccine's/Lisa's baseline)"
    summary = "fine-tuning on the upload mixed with safety (refusal) samples: added (Vaccine) or replacing benign (Lisa)"
    config_class = VlguardConfig
    required_roles = ("alignment",)
    preferred_topology = "double"  # as Vaccine/Lisa (docs/methods.md, Adapter topologies)

    def prepare_data(self, plan: DataPlan, run: RunConfig, stage: str) -> None:
        _load_safety(self, plan, run, stage)

    def extra_cost(self, run: RunConfig, stage: str) -> ExtraCost:
        if self.config.mode != "add":
            return ExtraCost()
        n = self.config.safety_samples
        return ExtraCost(samples=n, notes=[f"vlguard adds {n} safety samples"])

    def train_examples(self, examples: list[Example], plan: DataPlan) -> tuple[list[Example], dict[str, Any]]:
        pool, origin = _safety_pool(self, plan)
        # The plan guarantees this for its roles; checked here for the set this method actually draws from.
        check_disjoint({"vlguard safety": pool, "attack": plan.attack_pool, "evaluation": plan.eval_harmful})
        mixed, report = mix_safety_samples(
            examples,
            pool,
            plan.attack_pool,
            count=self.config.safety_samples,
            mode=self.config.mode,
            seed=plan.seed,
        )
        return mixed, {**report, "safety_source": origin}


# ----------------------------------------------------------------------------------------- regularised form


class VlguardRegTrainer(FtguardTrainer):
    """Per micro-batch: loss = ℓ(user batch) + λ·f(refusal batch of ``safety_batch_size``), one backward through
    both forwards (2F + 1B, as the original). f is a per-batch mean: when the Trainer normalises ℓ over the whole
    accumulation window (``num_items_in_batch``), λ·f takes the 1/GA factor itself, so accumulation averages the
    micro-batches as for SFT. The loss returned (logged) is ℓ + λ·f, as the original's; f alone is logged as
    ``vlguard_safety_loss``.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation reports the plain SFT loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        cfg: VlguardRegConfig = self.method_config
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        safety = super().compute_loss(model, self.aux_batch(SAFETY_STREAM, cfg.safety_batch_size))
        reg = self.scale_extra(cfg.lam * safety, num_items_in_batch)
        self.record(vlguard_safety_loss=safety)
        total = loss + reg
        return (total, outputs) if return_outputs else total


@register_method
class VlguardReg(Method):
    """Vlguard's regularised form, the Booster repo's baseline: ℓ + λ·f(4 refusals) per step
    (docs/methods.md, Vlguard)."""

    name = "vlguard_reg"
    # + a refusal batch of 4 beside a user batch of 10 (Booster's script): 1 + 4/10. Bench 1.39×.
    pass_factor = 1.4
    stages = ("finetune",)
    paper = "Zong et al., VLGuard, ICML 2024 (regularised form, as the Booster repo's baseline)"
    summary = "fine-tuning + λ·CE on a refusal batch every step (λ = 0.1, batch 4; 2F+1B per step)"
    config_class = VlguardRegConfig
    trainer_class = VlguardRegTrainer
    required_roles = ("alignment",)
    preferred_topology = "double"  # as Booster's baselines (docs/methods.md, Adapter topologies)

    def prepare_data(self, plan: DataPlan, run: RunConfig, stage: str) -> None:
        _load_safety(self, plan, run, stage)
        self._pool(plan, stage)

    def _pool(self, plan: DataPlan, stage: str) -> list[Example]:
        pool, origin = _safety_pool(self, plan)
        n = self.config.safety_samples
        if n is not None and n > len(pool):
            raise FtguardError(
                f"{stage}.args.safety_samples = {n} but {origin} has {len(pool)} samples: lower it or set it to null (all)"
            )
        return pool if n is None else pool[:n]

    def extra_datasets(self, ctx: StageContext) -> dict[str, Dataset]:
        pool = self._pool(ctx.plan, ctx.stage)
        if not pool:
            raise FtguardError(
                "vlguard_reg needs safety (refusal) samples but the data plan has none: check data.alignment"
            )
        return {SAFETY_STREAM: ctx.tokenize(pool)}
