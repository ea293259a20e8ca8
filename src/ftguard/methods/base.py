"""What a training method provides: a config dataclass, a Trainer subclass and the data it needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ftguard.schema import from_dict

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Trainer

    from ftguard.config import RunConfig
    from ftguard.cost import ExtraCost, GpuSpec
    from ftguard.data.example import Example
    from ftguard.data.plan import DataPlan
    from ftguard.methods.context import PostContext, StageContext


@dataclass
class NoArgs:
    """For methods without hyperparameters of their own."""


class Method:
    """Base of every training method (align and finetune stages).

    A subclass sets the class attributes and, where the update rule differs from SFT, a Trainer subclass
    (``trainer_class``) that overrides ``compute_loss`` or ``training_step``. Methods that need more data
    than the stage's own batches (a harmful stream, an alignment pool) return it from ``extra_datasets``;
    the trainer gets it as named, tokenized, cycling streams (see ``FtguardTrainer.aux_batch``).
    """

    name: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    paper: ClassVar[str]
    summary: ClassVar[str] = ""
    config_class: ClassVar[type] = NoArgs
    trainer_class: ClassVar[type[Trainer] | None] = None  # None = FtguardTrainer (plain SFT step)
    preferred_topology: ClassVar[str | None] = None  # the paper's adapter topology, used by `demo --methods`
    required_roles: ClassVar[
        tuple[str, ...]
    ] = ()  # data-plan roles that must be non-empty (checked before any work)

    # Training modes (ftguard.distributed.MODES) the method cannot run under → why, checked before any work by
    # ftguard.distributed.check_supported (e.g. {"deepspeed_zero3": "it steps the weights in place, and ZeRO-3
    # partitions them"}). DDP is never listed: every method runs data-parallel.
    unsupported_modes: ClassVar[dict[str, str]] = {}
    # Args that make `ftguard bench` time the method's steady-state step (e.g. Lisa's proximal term switched on
    # from step 0, where the paper's warm-up would leave it off for the whole short benchmark).
    bench_args: ClassVar[dict[str, Any]] = {}
    # Args for `ftguard demo --methods` (32 steps on a CPU), where a paper default would not fit that budget.
    demo_args: ClassVar[dict[str, Any]] = {}
    # FLOPs of one optimizer step relative to SFT on the same batch: the GPU-hour estimate of `ftguard sweep
    # --dry-run` multiplies the stage's training FLOPs by it. Each method states its own, with where it comes from.
    pass_factor: ClassVar[float] = 1.0

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def parse_args(cls, args: dict[str, Any] | None, prefix: str = "args") -> Any:
        return from_dict(cls.config_class, args or {}, prefix=prefix)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None, prefix: str = "args") -> Method:
        """The method with its args parsed (``prefix`` names them in errors): what ``ftguard.resolve`` builds once
        per stage."""
        return cls(cls.parse_args(args, prefix=prefix))

    def check_run_config(self, run: RunConfig, stage: str) -> None:
        """Reject or warn about run settings this method cannot honour (e.g. a topology)."""

    def judges(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Judges the method runs, by arg key → (judge name, options): checked by name before any work."""
        return {}

    def wrapped(self) -> dict[str, Method]:
        """Methods this one wraps, by arg key (the filter's ``then_args``): their args are checked too."""
        return {}

    def extra_cost(self, run: RunConfig, stage: str) -> ExtraCost:
        """Work the estimate counts besides ``pass_factor`` × the stage's steps: added training samples, one-off
        passes, judges reading the upload."""
        from ftguard.cost import ExtraCost

        return ExtraCost()

    def load_resources(self) -> None:
        """Load what the method needs besides data (a judge, ...), so that an unavailable one fails before any
        training. Not called by a dry run."""

    def prepare_data(self, plan: DataPlan, run: RunConfig, stage: str) -> None:
        """Check (and load, with ``plan.load_extra``) the data this method needs; runs before any training."""
        plan.require(self.required_roles, f"{stage}.method '{self.name}'")

    def train_examples(self, examples: list[Example], plan: DataPlan) -> tuple[list[Example], dict[str, Any]]:
        """The stage's training examples as this method trains on them (e.g. with safety samples mixed in), and
        a report of what changed for the stage manifest. Called once before training and once as a dry run
        while the run is prepared, so impossible requests fail before any work."""
        return examples, {}

    def extra_datasets(self, ctx: StageContext) -> dict[str, Dataset]:
        """Named extra streams for the trainer (tokenized datasets)."""
        return {}

    def create_trainer(self, ctx: StageContext, **trainer_kwargs: Any) -> Trainer:
        from ftguard.training.trainer import FtguardTrainer

        trainer_cls = self.trainer_class or FtguardTrainer
        return trainer_cls(method_config=self.config, aux_datasets=self.extra_datasets(ctx), **trainer_kwargs)


class PostMethod(Method):
    """Base of post-fine-tuning repairs (recovery, Antidote, SafeLoRA): no training loop, a function of models.

    ``repair`` gets a ``PostContext`` (the base, aligned and fine-tuned models as folders, the data plan, the
    tokenizer, a work folder for resumable state) and returns the repaired model, in memory, plus a JSON-able
    report for the stage manifest. The core saves the model (safetensors) and evaluates it as the ``post`` point.
    """

    stages: ClassVar[tuple[str, ...]] = ("post",)

    def repair(self, ctx: PostContext) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def cost(self, run: RunConfig, n_params: float, gpu: GpuSpec) -> dict[str, Any]:
        """The repair's GPU hours for the estimate, as ``ftguard.cost.cost_result`` builds them."""
        from ftguard.cost import cost_result

        return cost_result(0.0, 0, 0.0, [f"no cost model for post method '{self.name}': counted as 0"])

    def create_trainer(self, ctx: StageContext, **trainer_kwargs: Any) -> Trainer:
        raise TypeError(f"{self.name} is a post-stage method: it repairs models and has no trainer")
