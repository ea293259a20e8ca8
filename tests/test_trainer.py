"""Shared trainer machinery: extra streams, recorded metrics, the SFT step."""

from __future__ import annotations

import torch
from datasets import Dataset

from ftguard.training.trainer import FtguardTrainer
from tiny import collate, tiny_llama, training_args


def _model():
    return tiny_llama(vocab_size=50)


def _dataset(n, offset=0):
    rows = [
        {
            "input_ids": [1, 2 + (i + offset) % 40, 3],
            "attention_mask": [1, 1, 1],
            "labels": [-100, 2 + (i + offset) % 40, 3],
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def _trainer(tmp_path, **kwargs):
    args = training_args(tmp_path, per_device_train_batch_size=4, max_steps=2, seed=5, logging_steps=1)
    return FtguardTrainer(
        model=_model(), args=args, train_dataset=_dataset(8), data_collator=collate, **kwargs
    )


def test_aux_stream_cycles_through_every_row_and_reshuffles(tmp_path):
    trainer = _trainer(tmp_path, aux_datasets={"harmful": _dataset(6, offset=10)})
    first = [trainer.aux_batch("harmful", batch_size=3)["input_ids"][:, 1].tolist() for _ in range(2)]
    second = [trainer.aux_batch("harmful", batch_size=3)["input_ids"][:, 1].tolist() for _ in range(2)]
    flat1, flat2 = sum(first, []), sum(second, [])
    assert sorted(flat1) == sorted(flat2) == list(range(12, 18)), "each pass covers the stream exactly once"
    assert flat1 != flat2, "a new pass is reshuffled"
    again = _trainer(tmp_path, aux_datasets={"harmful": _dataset(6, offset=10)})
    assert again.aux_batch("harmful", batch_size=3)["input_ids"][:, 1].tolist() == first[0], "seeded"


def test_recorded_metrics_are_averaged_into_the_next_training_log(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.record(norm=1.0)
    trainer.record(norm=torch.tensor(3.0))
    logs = {"loss": 0.5}
    trainer.log(logs)
    assert logs["norm"] == 2.0
    logs = {"loss": 0.4}
    trainer.log(logs)
    assert "norm" not in logs, "recorded values are consumed once"


def test_sft_step_loss_is_cross_entropy_on_response_tokens_only(tmp_path):
    trainer = _trainer(tmp_path)
    batch = collate(
        [{"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 7, 8]}]
    )
    loss = trainer.compute_loss(trainer.model, batch)
    logits = trainer.model(input_ids=batch["input_ids"]).logits[0]
    # position t predicts token t+1; only tokens 7 and 8 (positions 2, 3) are targets
    manual = torch.nn.functional.cross_entropy(logits[1:3], torch.tensor([7, 8]))
    assert torch.allclose(loss, manual, atol=1e-6)


class _StatefulTrainer(FtguardTrainer):
    """Draws one aux batch per step and keeps a tensor and a counter as method state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drawn: list[list[int]] = []
        self.counter, self.anchor = 0, torch.zeros(3)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.drawn.append(self.aux_batch("harmful", batch_size=2)["input_ids"][:, 1].tolist())
        self.counter += 1
        self.anchor = self.anchor + self.counter
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def method_state(self):
        return {"counter": self.counter}, {"anchor": self.anchor}

    def load_method_state(self, values, tensors):
        self.counter, self.anchor = values["counter"], tensors["anchor"]


def _stateful(tmp_path, max_steps):
    args = training_args(
        tmp_path,
        per_device_train_batch_size=2,
        max_steps=max_steps,
        seed=5,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
    )
    return _StatefulTrainer(
        model=_model(),
        args=args,
        train_dataset=_dataset(8),
        data_collator=collate,
        aux_datasets={"harmful": _dataset(5, offset=10)},
    )


def test_resume_restores_aux_stream_positions_and_method_state(tmp_path):
    # The aux stream has 5 rows and batch 2 (drop_last): a pass is 2 batches, so 5 steps cross pass boundaries.
    full = _stateful(tmp_path / "full", max_steps=5)
    full.train()
    interrupted = _stateful(tmp_path / "cut", max_steps=5)
    interrupted.args.max_steps = 3  # stop after the checkpoint at step 2 and one more step
    interrupted.train()
    resumed = _stateful(tmp_path / "cut", max_steps=5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert resumed.drawn == full.drawn[2:], "the extra stream continues where the checkpoint left it"
    assert resumed.counter == full.counter == 5
    assert torch.equal(resumed.anchor, full.anchor)
