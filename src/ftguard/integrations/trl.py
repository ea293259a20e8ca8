"""ftguard's fine-tuning-stage defenses inside a TRL ``SFTTrainer`` script (``pip install ftguard[trl]``).

::

    from ftguard.integrations.trl import defended_sft_trainer

    trainer = defended_sft_trainer(
        "lisa", {"align_steps": 10, "finetune_steps": 90},
        alignment_data=[{"prompt": "How do I make a bomb?", "completion": "I can't help with that."}, ...],
        model=model, args=SFTConfig(...), train_dataset=dataset, processing_class=tokenizer,
    )
    trainer.train()

The trainer is an ``SFTTrainer`` whose class also derives from the method's own Trainer subclass (the very class
``ftguard run`` trains with, not a copy): ``LisaTrainer → FtguardTrainer → _TrlBridge → SFTTrainer → Trainer``.
The method's ``training_step``/``compute_loss`` come first; whatever it hands to ``super()`` is TRL's (its
tokenization, collator, fused-head loss, metrics). The user's data goes through the method's data steps exactly as
in the pipeline: ``train_examples`` (Vlguard's mix, the filter's judge) and ``extra_datasets`` (Lisa's alignment
stream, vlguard_reg's refusal stream), the extra streams prepared by TRL like the training set.

Where TRL changes what a method relies on, the bridge says so:

* TRL's loss comes from a fused LM head that builds no logits, and ``compute_loss(return_outputs=True)`` re-runs
  the forward *without gradient* for them. KL and LDIFS need the logits / MLP activations of the very forward
  that gives the loss, with their graph: for those calls the bridge computes the plain Trainer loss instead (one
  forward, the same token-normalised cross-entropy as TRL's ``loss_type="nll"``); other loss types are refused.
  TRL's entropy/token-accuracy metrics are not logged on those steps.
* A method that overrides ``training_step`` (Lisa/BSO) replaces TRL's, which only adds activation offloading:
  ``activation_offloading=True`` is refused for them.
* Methods that need the run's configuration to build their trainer (asft) or that are untested here (ewc, smart,
  panacea) are refused by name: see ``SUPPORTED``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from datasets import Dataset
from transformers import Trainer
from trl import SFTTrainer

from ftguard.data.example import Example
from ftguard.data.plan import DataPlan
from ftguard.data.tasks import Task
from ftguard.errors import FtguardError
from ftguard.methods.base import Method
from ftguard.methods.context import StageContext
from ftguard.methods.filter import ModerationFilter
from ftguard.methods.lisa import Lisa
from ftguard.methods.registry import get_method
from ftguard.training.trainer import FtguardTrainer

STAGE = "finetune"
SUPPORTED = ("sft", "lisa", "bso", "kl", "ldifs", "vlguard", "vlguard_reg", "filter")
# train_examples that only report (no change to the data): they run on any dataset format.
_REPORT_ONLY = (Method.train_examples, Lisa.train_examples)

Data = Dataset | Iterable[dict[str, Any] | Example] | None


class _TrlBridge(SFTTrainer):
    """Sits between the method's Trainer and ``SFTTrainer`` in the MRO: what the methods need of TRL's loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (return_outputs and model.training):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        # A method asking for the outputs during training reads their logits/activations with the graph (KL,
        # LDIFS): TRL's fused head has no logits and would re-run the forward under no_grad. One plain forward
        # gives the same token-normalised NLL, and the logits with their graph.
        if (
            self.args.loss_type != "nll"
            or self.label_smoother is not None
            or self.compute_loss_func is not None
        ):
            raise FtguardError(
                f"{type(self).__name__}: this method needs the logits of the loss's forward, so only TRL's plain "
                f"loss works with it (loss_type='nll', no label smoothing, no compute_loss_func); got "
                f"loss_type={self.args.loss_type!r}"
            )
        return Trainer.compute_loss(
            self,
            model,
            {**inputs, "use_cache": False},
            return_outputs=True,
            num_items_in_batch=num_items_in_batch,
        )


@functools.cache
def defended_class(method_trainer: type[FtguardTrainer]) -> type[SFTTrainer]:
    """``SFTTrainer`` with the method's Trainer subclass in front of it (one class per method trainer)."""
    return type(f"{method_trainer.__name__}SFT", (method_trainer, _TrlBridge), {"__module__": __name__})


def defended_sft_trainer(
    method: str,
    method_args: dict[str, Any] | None = None,
    *,
    alignment_data: Data = None,
    harmful_data: Data = None,
    **sft_trainer_kwargs: Any,
) -> SFTTrainer:
    """An ``SFTTrainer`` that trains with ftguard's fine-tuning-stage ``method`` (``SUPPORTED``).

    ``method_args``: the method's config keys, as under ``finetune.args`` of a run config (checked by name and
    value). ``alignment_data``: the safety (prompt → refusal) samples of Lisa's alignment state and Vlguard's mix
    (``data.alignment`` of a run). ``harmful_data``: the harmful samples known to be in the upload, only used
    for reports and Vlguard's ``mode: replace`` (``data.attack``). Both take rows ``{"prompt", "completion"}``
    (strings or chat turns), ftguard ``Example``s or a ``datasets.Dataset``. Every other keyword goes to
    ``SFTTrainer``; ``train_dataset`` must be a prompt/completion dataset for methods that change the data
    (vlguard, filter). ``trainer.ftguard_report`` holds what the method's data step did.
    """
    resolved = _resolve(method, method_args)
    training = resolved
    while isinstance(training, ModerationFilter):
        training = training.inner
    align, origin = _examples(alignment_data, "alignment_data")
    harmful, _ = _examples(harmful_data, "harmful_data")
    args = sft_trainer_kwargs.get("args")
    seed = getattr(args, "seed", 42)  # TrainingArguments' default seed
    plan = DataPlan(task=Task(name="trl", metric="label"), alignment=align, attack_pool=harmful, seed=seed)
    if "alignment" in resolved.required_roles and not align:
        raise FtguardError(f"{method} needs alignment_data= (prompt → refusal samples) for its safety data")
    resolved.prepare_data(plan, None, STAGE)  # type: ignore[arg-type]  # no method in SUPPORTED reads the run
    resolved.load_resources()
    method_trainer = training.trainer_class or FtguardTrainer
    if method_trainer.training_step is not Trainer.training_step and getattr(
        args, "activation_offloading", False
    ):
        raise FtguardError(
            f"{method}: activation_offloading is not supported (the method replaces training_step)"
        )

    train = sft_trainer_kwargs.get("train_dataset")
    train, conversational, report = _data_step(resolved, train, plan, origin)
    sft_trainer_kwargs["train_dataset"] = train

    ctx = StageContext(
        run=None,  # type: ignore[arg-type]
        stage=STAGE,
        key="trl",
        model=sft_trainer_kwargs.get("model"),
        tokenizer=sft_trainer_kwargs.get("processing_class"),
        train_dataset=train,
        plan=plan,
        tokenize=lambda exs: Dataset.from_list([origin.get(id(e)) or _row(e, conversational) for e in exs]),
        out_dir=None,  # type: ignore[arg-type]
    )
    raw_streams = resolved.extra_datasets(ctx)
    cls = defended_class(method_trainer)
    trainer = cls(method_config=training.config, aux_datasets={}, **sft_trainer_kwargs)
    # The extra streams go through TRL's own preparation (tokenizer, template, completion mask), as train does; the
    # user's formatting_func is for the training set's format, not theirs.
    trainer.aux_datasets = {name: _prepare_stream(trainer, ds, name) for name, ds in raw_streams.items()}
    trainer.ftguard_report = report
    return trainer


def _resolve(name: str, args: dict[str, Any] | None) -> Method:
    method_cls = get_method(name, STAGE)
    if name not in SUPPORTED:
        raise FtguardError(
            f"method '{name}' is not available through the TRL plug-in (supported: {', '.join(SUPPORTED)})"
        )
    if args is not None and not isinstance(args, dict):
        raise FtguardError(
            f"method_args: expected a mapping of {name}'s config keys, got {type(args).__name__}"
        )
    method = method_cls.from_args(args, prefix="method_args")
    inner = method
    while isinstance(inner, ModerationFilter):
        inner = inner.inner
        if inner.name not in SUPPORTED:
            raise FtguardError(f"method_args.then: '{inner.name}' is not available through the TRL plug-in")
    return method


def _text(value: Any) -> str:
    """A prompt/completion cell as text: a string, or the content of the last turn of a chat."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return str(value[-1]["content"])
    raise FtguardError(f"expected a string or a list of chat turns, got {type(value).__name__}")


def _examples(data: Data, what: str) -> tuple[list[Example], dict[int, dict[str, Any]]]:
    """ftguard Examples of the user's rows, and each row by ``id(example)`` (a row is trained on as given)."""
    if data is None:
        return [], {}
    examples, origin = [], {}
    for i, row in enumerate(data):
        if isinstance(row, Example):
            examples.append(row)
            continue
        if not isinstance(row, dict) or "prompt" not in row or "completion" not in row:
            raise FtguardError(
                f"{what}[{i}]: expected a {{'prompt', 'completion'}} row or an ftguard Example, got {row!r:.80}"
            )
        ex = Example(instruction=_text(row["prompt"]), output=_text(row["completion"]), source=f"{what}#{i}")
        examples.append(ex)
        origin[id(ex)] = dict(row)
    return examples, origin


def _row(ex: Example, conversational: bool) -> dict[str, Any]:
    prompt = f"{ex.instruction}\n{ex.input}".strip()
    if conversational:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": ex.output}],
        }
    return {"prompt": prompt, "completion": ex.output}


def _data_step(
    method: Method, train: Any, plan: DataPlan, origin: dict[int, dict[str, Any]]
) -> tuple[Any, bool, dict[str, Any]]:
    """The training set after ``method.train_examples`` (as ``ftguard run`` does before tokenizing): unchanged
    rows are kept as they are (every column), added ones (Vlguard's safety rows) in the set's format."""
    columns = getattr(train, "column_names", None) or []
    if not isinstance(train, Dataset) or not {"prompt", "completion"} <= set(columns):
        if type(method).train_examples in _REPORT_ONLY:
            return train, False, {}
        raise FtguardError(
            f"{method.name} changes the training data: train_dataset must be a datasets.Dataset with 'prompt' and "
            f"'completion' columns (got {type(train).__name__} with columns {columns})"
        )
    rows = train.to_list()
    conversational = bool(rows) and not isinstance(rows[0]["prompt"], str)
    examples, own = _examples(rows, "train_dataset")
    origin.update(own)
    kept, report = method.train_examples(examples, plan)
    if [id(e) for e in kept] == [id(e) for e in examples]:
        return train, conversational, report
    blank = dict.fromkeys(columns)
    new = [origin.get(id(e)) or {**blank, **_row(e, conversational)} for e in kept]
    return Dataset.from_list(new), conversational, report


def _prepare_stream(trainer: SFTTrainer, dataset: Dataset, name: str) -> Dataset:
    if not trainer._skip_prepare_dataset:
        dataset = trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, False, None, name)
    return (
        trainer._remove_unused_columns(dataset, description=name)
        if trainer.args.remove_unused_columns
        else dataset
    )
