"""Lisa and BSO: bi-state optimization in the user fine-tuning stage (Huang et al., NeurIPS 2024;
docs/methods.md, Lisa and BSO).

One model, one AdamW state and one LR schedule alternate between two states, by optimizer-step counts:
K_a alignment steps (the user batch is replaced by a batch of the alignment pool), then K_f fine-tune steps
(the user batch), and so on. Each state's loss adds (ρ/2)·‖w − w̃‖², w̃ being the last iterate of the *other*
state. BSO is the same alternation with ρ = 0.

Differences from the original ``git-disl/Lisa`` ``ADMMTrainer``, all where it is only right with accumulation 1
(its scripts use 1) or a matter of counting; none changes the method:

* Steps are optimizer steps (``state.global_step``), not micro-batches, so all micro-batches of one optimizer
  step are in the same state and a switch never falls inside an accumulation window.
* The proximal term is added once per optimizer step (the original adds it, unscaled, to every micro-batch),
  and the alignment loss is normalised over the alignment batches of the window, as the Trainer normalises the
  user batches (the original never divides by the accumulation steps).
* The warm-up is "off for the first ⌈r·T⌉ steps"; the original's strict ``steps > 0.1·T`` keeps it off one
  step longer when 0.1·T is a whole number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from ftguard.config import SourceConfig
from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.registry import register_method
from ftguard.schema import check
from ftguard.training.trainer import FtguardTrainer

if TYPE_CHECKING:
    from datasets import Dataset

    from ftguard.config import RunConfig
    from ftguard.data.example import Example
    from ftguard.data.plan import DataPlan
    from ftguard.methods.context import StageContext

ALIGNMENT, FINETUNE = "alignment", "finetune"
EXTRA_POOL = "lisa_alignment"  # name of an alignment pool loaded with DataPlan.load_extra
STREAM = "alignment"  # name of the trainer's extra stream


@dataclass
class BiStateConfig:
    """What Lisa and BSO share: the schedule and the alignment pool. Defaults: the Lisa repo's
    scripts (docs/methods.md, Lisa and BSO)."""

    align_steps: int = field(
        default=100, metadata={"help": "K_a, optimizer steps per alignment state (Lisa repo: 100)"}
    )
    finetune_steps: int = field(
        default=900, metadata={"help": "K_f, optimizer steps per fine-tune state (Lisa repo: 900)"}
    )
    proximal_warmup_ratio: float = field(
        default=0.1,
        metadata={"help": "the proximal term is off for the first ⌈ratio·total steps⌉ (Lisa's code: 0.1)"},
    )
    first_state: Literal["alignment", "finetune"] = field(
        default=ALIGNMENT,
        metadata={
            "help": "state of the first steps: alignment (as Lisa) or finetune (the bench uses it to time "
            "the fine-tune state)"
        },
    )
    alignment_data: SourceConfig | None = field(
        default=None,
        metadata={
            "help": "alignment pool of the alignment state; null = the run's data.alignment set (refusals). The Lisa "
            "paper used the first 10,000 is_safe BeaverTails answers: {source: beavertails, split: train, "
            "response: safe, n: 10000}, which needs the hub (docs/methods.md, Alignment data)"
        },
    )

    def __post_init__(self) -> None:
        check(self.align_steps >= 1, "align_steps", f"must be ≥ 1 (K_a), got {self.align_steps}")
        check(self.finetune_steps >= 1, "finetune_steps", f"must be ≥ 1 (K_f), got {self.finetune_steps}")
        check(
            0.0 <= self.proximal_warmup_ratio <= 1.0,
            "proximal_warmup_ratio",
            f"must be in [0, 1], got {self.proximal_warmup_ratio}",
        )


@dataclass
class LisaConfig(BiStateConfig):
    rho: float = field(
        default=1.0,
        metadata={
            "help": "ρ, weight of the proximal term (ρ/2)·‖w − w̃‖² (1 in the Lisa repo; the Booster "
            "repo's Lisa baseline used 0.01)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            math.isfinite(self.rho) and self.rho >= 0, "rho", f"must be a finite number ≥ 0, got {self.rho}"
        )


@dataclass
class BsoConfig(BiStateConfig):
    rho: ClassVar[float] = 0.0  # BSO is Lisa without the proximal term; not a config key


def schedule_state(step: int, cfg: BiStateConfig) -> tuple[str, int]:
    """(state of optimizer step ``step``, 0-based index of that step within its run of the state)."""
    first, second = (
        (cfg.align_steps, cfg.finetune_steps)
        if cfg.first_state == ALIGNMENT
        else (cfg.finetune_steps, cfg.align_steps)
    )
    other = FINETUNE if cfg.first_state == ALIGNMENT else ALIGNMENT
    phase = step % (first + second)
    return (cfg.first_state, phase) if phase < first else (other, phase - first)


class SquaredDistance(torch.autograd.Function):
    """‖w − a‖² summed over lists of tensors, gradient 2·(w − a) for w (a is a constant); foreach kernels, so the
    cost is a few elementwise passes over the trainable weights whatever their number of tensors."""

    @staticmethod
    def forward(ctx: Any, anchors: list[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.anchors = anchors
        ctx.save_for_backward(*params)
        norms = torch._foreach_norm(torch._foreach_sub([p.detach() for p in params], anchors))
        return torch.stack(norms).float().pow(2).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        diffs = torch._foreach_sub([p.detach() for p in ctx.saved_tensors], ctx.anchors)
        torch._foreach_mul_(diffs, 2.0 * grad)
        return (None, *diffs)


class LisaTrainer(FtguardTrainer):
    """Bi-state optimization (Lisa; BSO when ρ = 0). For optimizer step t, at its first micro-batch:

    1. State: ``schedule_state(t)``; the first step of a new state (t > 0) snapshots the trainable weights as the
       anchor of the state just left (they are that state's last iterate). Both anchors start as the initial
       weights, as in the original.
    2. Alignment state: the Trainer's user batches of this step are replaced by as many batches of the alignment
       pool (cycled, reshuffled each pass); when the Trainer normalises by the response tokens of the whole
       accumulation window (``num_items_in_batch``), the alignment batches are normalised by their own count.
    3. Loss: the state's CE (scaled like the Trainer scales it) plus, once per optimizer step and from step
       ⌈r·T⌉ on, (ρ/2)·‖w − w̃‖² with w̃ the anchor of the other state. One forward and one backward pass per
       micro-batch; the Trainer clips (1.0) and takes the shared AdamW step.

    DDP: the anchors are snapshots of the replicated weights, so they are identical on every rank without any
    communication; the proximal gradient joins ``.grad`` in the micro-batch's single backward and is averaged
    with the rest by the Trainer's one reduce per optimizer step. The only collective added is the Trainer's own
    token count (``get_batch_samples``) for the alignment batches, when it counts tokens across devices.

    The loss returned (and logged as ``loss``) is the state's CE plus the proximal term, as in the original.
    Logged (``record``): lisa_alignment_state (1 / 0, its mean is the share of alignment steps), lisa_proximal
    ((ρ/2)·‖w − w̃‖² as added to the loss, 0 in warm-up and for BSO) and lisa_drift (‖w − w̃‖).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchors: dict[str, list[torch.Tensor]] | None = None  # state -> that state's last iterate
        self._named: list[tuple[str, nn.Parameter]] | None = None
        self._window_step: int | None = None  # optimizer step whose micro-batches are being run
        self._micro = 0
        self._window: list[dict[str, Any]] = []
        self._window_items: Any = None
        self._resumed: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the step

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        cfg: BiStateConfig = self.method_config
        step = self.state.global_step
        micro = self._next_micro_batch(step)
        state, index = schedule_state(step, cfg)
        other = FINETUNE if state == ALIGNMENT else ALIGNMENT
        if micro == 0:
            # 1. Anchors: start, resume check, or a switch (the weights are the last iterate of the state left).
            self._ensure_anchors(step)
            if step > 0 and index == 0:
                torch._foreach_copy_(self.anchors[other], self._params())
            # 2. The alignment batches of the whole window, and their token count.
            if state == ALIGNMENT:
                self._window = [
                    self.aux_batch(STREAM) for _ in range(self.current_gradient_accumulation_steps)
                ]
                self._window_items = None
                if num_items_in_batch is not None:
                    _, self._window_items = self.get_batch_samples(
                        iter(self._window), len(self._window), self.args.device
                    )
        if state == ALIGNMENT:
            inputs, num_items_in_batch = self._window[micro], self._window_items

        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            self.begin_step(model)
            inputs = self._prepare_inputs(inputs)
            # 3. The state's loss, plus the proximal term once per optimizer step.
            loss = self.scaled_loss(model, inputs, num_items_in_batch)
            if micro == 0 and (term := self._proximal(step, state, self.anchors[other])) is not None:
                loss = loss + term
            self.accelerator.backward(loss)
            return loss.detach()

    def _proximal(self, step: int, state: str, anchor: list[torch.Tensor]) -> torch.Tensor | None:
        """(ρ/2)·‖w − anchor‖², None in warm-up and for BSO; records the step's log entries."""
        cfg: BiStateConfig = self.method_config
        rho = float(cfg.rho)
        params = self._params()
        # round: 0.1 · 1000 is 100.00000000000001 in floating point
        warmup = math.ceil(round(cfg.proximal_warmup_ratio * self._total_steps(), 6))
        active = rho > 0 and step >= warmup
        with torch.set_grad_enabled(active and torch.is_grad_enabled()):
            sq = SquaredDistance.apply(anchor, *params)
        term = 0.5 * rho * sq if active else None
        self.record(
            lisa_alignment_state=float(state == ALIGNMENT),
            lisa_proximal=term.detach() if term is not None else 0.0,
            lisa_drift=sq.detach().sqrt(),
        )
        return term

    def _next_micro_batch(self, step: int) -> int:
        """Index of this call within its optimizer step: a new step starts when ``global_step`` moves on or the
        window is full (the bench calls each optimizer step at the same ``global_step``)."""
        if step != self._window_step or self._micro >= self.current_gradient_accumulation_steps:
            self._window_step, self._micro = step, 0
        self._micro += 1
        return self._micro - 1

    def _total_steps(self) -> int:
        # state.max_steps is set by train(); a bare training_step (the bench) has only the arguments.
        return self.state.max_steps or max(self.args.max_steps, 0)

    def _params(self) -> list[nn.Parameter]:
        return [p for _, p in self._named_params()]

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        # self.model, not the (possibly DDP-wrapped) model passed in: the same tensors, with stable names.
        if self._named is None:
            self._named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            if not self._named:
                raise FtguardError("lisa: the model has no trainable parameters (check adapter.topology)")
        return self._named

    def _ensure_anchors(self, step: int) -> None:
        cfg: BiStateConfig = self.method_config
        if self._resumed is not None:
            saved, self._resumed = self._resumed, None
            if saved["schedule"] != _schedule(cfg):
                raise FtguardError(
                    f"lisa: the checkpoint was written with the schedule {saved['schedule']} but the config now says "
                    f"{_schedule(cfg)}: resume with the same first_state/align_steps/finetune_steps or start afresh"
                )
            if step > 0 and saved["last_step"] != list(schedule_state(step - 1, cfg)):
                raise FtguardError(
                    f"lisa: the checkpoint's state {saved['last_step']} does not match step {step}: start the stage afresh"
                )
        if self.anchors is None:
            if step > 0:
                raise FtguardError(
                    f"lisa: resuming at step {step} without the anchors of the two states (the checkpoint has no "
                    "ftguard method state): start the stage afresh"
                )
            start = [p.detach().clone() for p in self._params()]
            self.anchors = {ALIGNMENT: start, FINETUNE: [t.clone() for t in start]}
        params = self._params()
        for state, tensors in self.anchors.items():
            if tensors and (tensors[0].device != params[0].device):
                self.anchors[state] = [t.to(p.device, p.dtype) for t, p in zip(tensors, params, strict=True)]

    # ------------------------------------------------------------------ checkpoint state

    def method_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        cfg: BiStateConfig = self.method_config
        if self.anchors is None:
            return {}, {}
        last = self.state.global_step - 1  # the step just completed
        values = {
            "schedule": _schedule(cfg),
            "last_step": list(schedule_state(last, cfg)) if last >= 0 else None,
        }
        tensors = {
            f"{state}/{name}": t
            for state, anchor in self.anchors.items()
            for (name, _), t in zip(self._named_params(), anchor, strict=True)
        }
        return values, tensors

    def load_method_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not values:
            return
        names = [n for n, _ in self._named_params()]
        missing = [f"{s}/{n}" for s in (ALIGNMENT, FINETUNE) for n in names if f"{s}/{n}" not in tensors]
        if missing:
            raise FtguardError(
                f"lisa: the checkpoint lacks {len(missing)} anchor tensors (e.g. {missing[0]}): the trainable "
                "parameters changed since it was written; start the stage afresh"
            )
        self.anchors = {s: [tensors[f"{s}/{n}"] for n in names] for s in (ALIGNMENT, FINETUNE)}
        self._resumed = values


def _schedule(cfg: BiStateConfig) -> list[Any]:
    return [cfg.first_state, cfg.align_steps, cfg.finetune_steps]


# ---------------------------------------------------------------------------------------------- methods


@register_method
class Lisa(Method):
    """Lazy safety alignment: fine-tuning that alternates alignment and user steps, each state pulled toward the
    other's last iterate, so the fine-tuned model drifts less from the aligned one
    (docs/methods.md, Lisa and BSO)."""

    name = "lisa"
    # One pass per step plus an elementwise proximal term; its alignment steps replace user steps, so the step
    # count is SFT's. Bench 0.94×.
    pass_factor = 1.0
    stages = ("finetune",)
    paper = "Huang et al., Lisa: Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning Attack, NeurIPS 2024"
    summary = "K_a alignment / K_f user steps in turn, each + (ρ/2)·‖w − other state's last iterate‖²; 1F+1B per step"
    config_class = LisaConfig
    trainer_class = LisaTrainer
    required_roles = ("alignment",)
    preferred_topology = "double"  # as the Lisa repo (docs/methods.md, Adapter topologies)
    # ZeRO-0/1/2 keep every weight whole on every rank, and the proximal gradient reaches .grad through the one
    # backward, like the loss's: nothing there needs a refusal.
    unsupported_modes: ClassVar[dict[str, str]] = {
        mode: "it keeps whole copies of the trainable weights (each state's last iterate) and a proximal term "
        f"over them, and {label} shards the weights"
        for mode, label in (("fsdp", "FSDP"), ("deepspeed_zero3", "ZeRO-3"))
    }
    # Time the steady state: the fine-tune state (90% of the steps) with the proximal term on from step 0.
    bench_args: ClassVar[dict[str, Any]] = {"proximal_warmup_ratio": 0.0, "first_state": FINETUNE}
    # K_a/K_f = 100/900 would make a 32-step fine-tune all alignment: 4/12 gives two alignment states (as lisa-smollm2).
    demo_args: ClassVar[dict[str, Any]] = {"align_steps": 4, "finetune_steps": 12}

    def prepare_data(self, plan: DataPlan, run: RunConfig, stage: str) -> None:
        spec = self.config.alignment_data
        if spec is None:
            plan.require(("alignment",), f"{stage}.method '{self.name}' (its alignment state)")
            return
        key = f"{stage}.args.alignment_data"
        examples = plan.load_extra(EXTRA_POOL, spec, key)
        if any(not ex.output for ex in examples):
            raise FtguardError(
                f"{key}: {spec.source}/{spec.split} gave prompts without answers: set {key}.response (e.g. safe)"
            )

    def _pool(self, plan: DataPlan) -> list[Example]:
        if self.config.alignment_data is None:
            return plan.alignment
        if EXTRA_POOL not in plan.extra:
            raise FtguardError(f"{self.name}: args.alignment_data was not loaded (prepare_data did not run)")
        return plan.extra[EXTRA_POOL]

    def train_examples(self, examples: list[Example], plan: DataPlan) -> tuple[list[Example], dict[str, Any]]:
        source = "data.alignment" if self.config.alignment_data is None else "args.alignment_data"
        return examples, {"alignment_pool": source, "alignment_pool_size": len(self._pool(plan))}

    def extra_datasets(self, ctx: StageContext) -> dict[str, Dataset]:
        pool = self._pool(ctx.plan)
        if not pool:
            raise FtguardError(
                f"{self.name} needs an alignment pool for its alignment state, and data.alignment is empty"
            )
        return {STREAM: ctx.tokenize(pool)}


@register_method
class BSO(Lisa):
    """Bi-state optimization without the proximal term: Lisa with ρ = 0, the paper's ablation
    (docs/methods.md, Lisa and BSO)."""

    name = "bso"
    paper = Lisa.paper + " (BSO: Lisa with ρ = 0)"
    summary = "K_a alignment / K_f user steps in turn (Lisa with ρ = 0); 1F+1B per step"
    config_class = BsoConfig
