"""Trains SFT, Vaccine, Booster, RepNoise and Lisa for a few steps on a tiny LoRA Llama, and saves the LoRA weights.

``torchrun --nproc_per_node 2 ddp_parity_worker.py OUT``: data parallel, per-device batch B (rank 0 writes
``OUT/two.safetensors``, after checking that the ranks hold the same weights).
``python ddp_parity_worker.py OUT --single``: one process, the references (``OUT/one.safetensors``):

* ``<method>``: batch 2B (the same global batch), the harmful batch of Booster doubled likewise;
* ``<method>@micro``: batch B with twice the accumulation steps, each micro-batch one rank's share (for SFT
  the same update as the batch-2B run; for RepNoise the only exact reference, see test_distributed_parity.py).

Only the references the test uses are trained, unless ``--all``. ``--reversed`` reverses the rows of every
collated batch (training and extra streams alike): the same update in exact arithmetic with every sum over rows
taken in another order, which is how the tolerance of the test was measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainingArguments

import ftguard.methods  # noqa: F401  (registers the built-in methods)
from ddp_worker import flat_weights, rows
from ftguard.distributed import shutdown
from ftguard.methods.registry import all_methods, get_method
from ftguard.training.trainer import FtguardTrainer
from tiny import collate, tiny_lora_llama

B, GA, STEPS, HARMFUL_B = 2, 2, 3, 2
# Lisa: one alignment step, then two fine-tune steps, the second pulled toward the first state's last iterate
# (the first step of each state starts at that state's anchor, where the proximal gradient is zero).
# RepNoise: β = 0, because its MMD compares the activations with Gaussian noise that each process draws from
# its own generator: no run with another split of the batch can draw the same noise for the same rows.
METHODS = {
    "sft": {},
    "vaccine": {},
    "booster": {"harmful_batch_size": HARMFUL_B},
    "repnoise": {"beta": 0.0},
    "lisa": {"align_steps": 1, "finetune_steps": 2, "proximal_warmup_ratio": 0.0},
}
STREAMS = ("harmful", "alignment")
REFERENCES = {
    "sft": ("", "@micro"),
    "vaccine": ("",),
    "booster": ("",),
    "repnoise": ("@micro",),
    "lisa": ("",),
}


def reversed_collate(batch):
    return collate(batch[::-1])


def train(
    method_name: str, method_args: dict, out_dir: str, batch: int, ga: int, reverse: bool
) -> torch.Tensor:
    stage = "align" if "align" in all_methods()[method_name].stages else "finetune"
    method = get_method(method_name, stage)
    model = tiny_lora_llama()
    args = TrainingArguments(
        output_dir=f"{out_dir}/{method_name}",
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        max_steps=STEPS,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo" if dist.is_torchelastic_launched() else None,
        seed=3,
        data_seed=3,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = (method.trainer_class or FtguardTrainer)(
        model=model,
        args=args,
        train_dataset=rows(32, 1),
        data_collator=reversed_collate if reverse else collate,
        method_config=method.parse_args(method_args),
        aux_datasets={name: rows(32, 2 + i) for i, name in enumerate(STREAMS)},
    )
    trainer.train()
    return flat_weights(model)


def main() -> None:
    out_dir, flags = sys.argv[1], set(sys.argv[2:])
    reverse = "--reversed" in flags
    if "--single" in flags:
        weights = {"start": flat_weights(tiny_lora_llama())}
        for name, args in METHODS.items():
            wanted = ("", "@micro") if "--all" in flags else REFERENCES[name]
            if "" in wanted:
                doubled = {**args, "harmful_batch_size": 2 * HARMFUL_B} if name == "booster" else args
                weights[name] = train(name, doubled, out_dir, 2 * B, GA, reverse)
            if "@micro" in wanted:
                weights[f"{name}@micro"] = train(name, args, out_dir, B, 2 * GA, reverse)
        save_file(weights, f"{out_dir}/one{'-reversed' if reverse else ''}.safetensors")
        return
    weights, identical = {}, {}
    for name, args in METHODS.items():
        w = train(name, args, out_dir, B, GA, reverse)
        gathered = [torch.empty_like(w) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, w)
        weights[name], identical[name] = w, all(torch.equal(gathered[0], g) for g in gathered)
    if dist.get_rank() == 0:
        save_file(weights, f"{out_dir}/two.safetensors")
        Path(out_dir, "two.json").write_text(
            json.dumps({"world_size": dist.get_world_size(), "ranks_identical": identical})
        )
    shutdown()


if __name__ == "__main__":
    main()
