"""The Trainer every ftguard method builds on.

It adds three pieces of shared machinery to ``transformers.Trainer`` and changes nothing else, so
accelerate/DeepSpeed/FSDP, gradient accumulation, mixed precision, logging and checkpointing all come from
the ecosystem:

* ``aux_batch(name)``: the next batch of a named extra stream (a harmful set for Booster, an alignment
  pool for Lisa), from a seeded, cycling, rank-sharded loader;
* ``record(**metrics)``: extra scalars (perturbation norm, probe losses...) averaged into the next log line;
* the method's typed config as ``self.method_config``;
* checkpoints that also hold the positions of the extra streams and the method's own state
  (``method_state`` / ``load_method_state``, e.g. Lisa's anchors), so a resumed run continues exactly.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STATE_FILE = "ftguard_state.json"
METHOD_TENSORS_FILE = "ftguard_method_state.safetensors"


class RankSlices(Sampler[list[int]]):
    """Batches of one rank: the rank-th contiguous slice of each global batch of ``batch_size · world_size``.

    This is how the Trainer shards its own batches (accelerate gives rank r the r-th of each run of world_size
    consecutive batches), so the extra batch a rank draws is the share of the global extra batch that belongs
    with that rank's training batch: with one process and ``batch_size · world_size``, the same global batches
    come in the same order (methods that pair the two batches row by row, like RepNoise, depend on it). A short
    last global batch is dropped with ``drop_last``; otherwise it is padded by repetition (as
    ``DistributedSampler`` pads) so that every rank gets an equal, non-empty share.
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, world_size: int, rank: int, *, drop_last: bool
    ) -> None:
        self.sampler, self.batch_size, self.world_size, self.rank = sampler, batch_size, world_size, rank
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        span = self.batch_size * self.world_size
        for start in range(0, len(order), span):
            batch = order[start : start + span]
            if len(batch) < span:
                if self.drop_last:
                    return
                share = -(-len(batch) // self.world_size)
                batch = (batch * self.world_size)[: share * self.world_size]
            share = len(batch) // self.world_size
            yield batch[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        n, span = len(self.sampler), self.batch_size * self.world_size
        return n // span if self.drop_last else -(-n // span)


def _is_write_failure(exc: RuntimeError) -> bool:
    text = str(exc)
    return any(
        m in text for m in ("PytorchStreamWriter", "file write failed", "unexpected pos", "No space left")
    )


def resumable_checkpoint(folder: str | Path) -> str | None:
    """The newest checkpoint in ``folder`` whose ftguard state, written last, is in place.

    The others were torn by a kill or a write error while being written, and are deleted: the Trainer would
    resume from one (the highest step wins: a wrong optimizer, data position or method state) or, rotating,
    keep it as the newest and delete a complete one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    complete = {}
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if not (path.is_dir() and step.isdigit()):
            continue
        if (path / STATE_FILE).is_file():
            complete[int(step)] = path
        else:
            shutil.rmtree(path, ignore_errors=True)
    return str(complete[max(complete)]) if complete else None


class FtguardTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        method_config: Any = None,
        aux_datasets: dict[str, Dataset] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # Trainer sets this inside its loop only; methods' training_step (and the bench) may run outside it.
        self.current_gradient_accumulation_steps = self.args.gradient_accumulation_steps
        self.method_config = method_config
        self.aux_datasets = dict(aux_datasets or {})
        self._aux_iters: dict[tuple[str, int], Iterator[dict[str, torch.Tensor]]] = {}
        self._aux_epochs: dict[tuple[str, int], int] = defaultdict(int)
        self._aux_drawn: dict[tuple[str, int], int] = defaultdict(int)  # batches drawn in the current epoch
        self._recorded: dict[str, list[float]] = defaultdict(list)

    # ------------------------------------------------------------------ extra data streams

    def _aux_loader(self, name: str, batch_size: int, epoch: int) -> DataLoader:
        dataset = self.aux_datasets[name]
        # A distinct, reproducible order per stream and per pass over it.
        seed = self.args.seed + 7919 * (1 + sorted(self.aux_datasets).index(name)) + epoch
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        world = max(self.args.world_size, 1)
        return DataLoader(
            dataset,
            batch_sampler=RankSlices(
                sampler,
                batch_size,
                world,
                self.args.process_index if world > 1 else 0,
                drop_last=len(dataset) >= batch_size * world,
            ),
            collate_fn=self.data_collator,
        )

    def aux_batch(self, name: str, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Next batch of stream ``name`` on the training device; the stream restarts, reshuffled, when exhausted."""
        if name not in self.aux_datasets:
            raise KeyError(f"no extra stream '{name}' (have: {sorted(self.aux_datasets)})")
        batch_size = batch_size or self.args.per_device_train_batch_size
        key = (name, batch_size)
        for _ in range(2):
            if key not in self._aux_iters:
                self._aux_iters[key] = self._aux_iterator(name, batch_size)
            try:
                batch = next(self._aux_iters[key])
                self._aux_drawn[key] += 1
                return self._prepare_inputs(batch)
            except StopIteration:
                self._aux_epochs[key] += 1
                self._aux_drawn[key] = 0
                del self._aux_iters[key]
        raise RuntimeError(f"extra stream '{name}' is empty")

    def _aux_iterator(self, name: str, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        key = (name, batch_size)
        loader = self._aux_loader(name, batch_size, self._aux_epochs[key])
        # After a resume, skip what was drawn before the checkpoint (indices only: no collation).
        skip = self._aux_drawn[key]
        if not skip:
            return iter(loader)
        indices = list(loader.batch_sampler)[skip:]
        dataset, collate = loader.dataset, loader.collate_fn
        return (collate([dataset[i] for i in batch]) for batch in indices)

    # ------------------------------------------------------------------ checkpoint state

    def method_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able values, tensors) a method must keep across a resume; override in stateful methods."""
        return {}, {}

    def load_method_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``method_state`` returned."""

    def _save_checkpoint(self, model, trial) -> None:
        # The Trainer deletes older checkpoints before our state below is written: a kill or a write error in
        # between would leave no complete checkpoint. Delete them only once this one is complete.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        except RuntimeError as exc:
            # torch.save reports a failed write (full disk, quota) as a RuntimeError from its zip writer: it is
            # the environment's fault, and must read as such (one line, "run again"), not as a crash.
            if not _is_write_failure(exc):
                raise
            folder = (
                Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise OSError(errno.EIO, f"writing the checkpoint failed ({reason})", str(folder)) from exc
        finally:
            self.args.save_total_limit = limit
        if not self.args.should_save:
            return
        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        values, tensors = self.method_state()
        state = {
            "aux_streams": [
                {
                    "name": name,
                    "batch_size": bs,
                    "epoch": self._aux_epochs[(name, bs)],
                    "drawn": self._aux_drawn[(name, bs)],
                }
                for (name, bs) in sorted(set(self._aux_epochs) | set(self._aux_drawn))
            ],
            "method": values,
        }
        if tensors:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                str(folder / METHOD_TENSORS_FILE),
            )
        # Written last: its presence says the method state of this checkpoint is complete.
        tmp = folder / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, folder / STATE_FILE)
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = resumable_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            self._load_ftguard_state(Path(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_ftguard_state(self, folder: Path) -> None:
        path = folder / STATE_FILE
        if not path.exists():
            return  # a checkpoint of a plain Trainer: nothing of ours to restore
        state = json.loads(path.read_text())
        for stream in state.get("aux_streams", []):
            key = (stream["name"], stream["batch_size"])
            self._aux_epochs[key], self._aux_drawn[key] = stream["epoch"], stream["drawn"]
            self._aux_iters.pop(key, None)
        tensors_path = folder / METHOD_TENSORS_FILE
        tensors = load_file(str(tensors_path), device="cpu") if tensors_path.exists() else {}
        self.load_method_state(state.get("method", {}), tensors)

    # ------------------------------------------------------------------ pieces of Trainer.training_step

    def begin_step(self, model: torch.nn.Module) -> None:
        """What Trainer.training_step does before its forward (train mode, schedule-free optimizers)."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()

    def scaled_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """The loss exactly as ``Trainer.training_step`` backpropagates it (autocast, multi-GPU mean, 1/accumulation)."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        return (
            loss
            if self.loss_normalised_over_window(num_items_in_batch)
            else loss / self.current_gradient_accumulation_steps
        )

    def loss_normalised_over_window(self, num_items_in_batch: Any) -> bool:
        """Whether ``compute_loss`` already divides by the tokens of the whole accumulation window (so the Trainer
        will not divide by the number of micro-batches): then a per-micro-batch extra term must be divided by it.

        Mirrors the test in ``Trainer.training_step``.
        """
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def scale_extra(self, term: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        """A per-micro-batch extra loss term, scaled like the stage loss it is added to."""
        return (
            term / self.current_gradient_accumulation_steps
            if self.loss_normalised_over_window(num_items_in_batch)
            else term
        )

    # ------------------------------------------------------------------ extra metrics

    def record(self, **metrics: float | torch.Tensor) -> None:
        """Remember scalars to be averaged into the next training log entry."""
        for key, value in metrics.items():
            # Non-finite values are logged as they are: hiding them would hide divergence.
            self._recorded[key].append(
                value.detach().float().item() if isinstance(value, torch.Tensor) else float(value)
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._recorded:
            for key, values in self._recorded.items():
                logs[key] = sum(values) / len(values)
            self._recorded.clear()
        super().log(logs, start_time)
