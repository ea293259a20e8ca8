"""Run under ``torchrun --nproc_per_node 2``: every training method trains a tiny LoRA Llama data-parallel (gloo).

For each method it counts DDP's bucket reductions (a comm hook that wraps the default all-reduce) and checks
that both ranks end with identical weights that moved away from the start. Rank 0 writes a JSON report to
``argv[1]``; ``test_distributed.py`` compares the methods with SFT.
"""

from __future__ import annotations

import gc
import json
import sys
import weakref

import torch
import torch.distributed as dist
from datasets import Dataset
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import TrainerCallback, TrainingArguments

import ftguard.methods  # noqa: F401  (registers the built-in methods)
from ftguard.distributed import shutdown
from ftguard.methods.registry import all_methods, get_method
from ftguard.training.trainer import FtguardTrainer
from tiny import collate, tiny_lora_llama

SEQ, STEPS, GA = 9, 2, 2
# Method → args: small schedules so that two steps exercise the method's extra machinery.
METHODS = {
    "sft": {},
    "vaccine": {},
    "booster": {},
    "repnoise": {},
    "lisa": {"align_steps": 1, "finetune_steps": 1, "proximal_warmup_ratio": 0.0},
    "ewc": {},
    "vlguard_reg": {},
    "ldifs": {},
    "kl": {},
}
STREAMS = ("harmful", "alignment", "fisher", "safety")  # every extra stream a method may ask for


def rows(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, SEQ), generator=g)
    return Dataset.from_list(
        [
            {"input_ids": r.tolist(), "attention_mask": [1] * SEQ, "labels": [-100] * 3 + r[3:].tolist()}
            for r in ids
        ]
    )


class CountReductions(TrainerCallback):
    """Wraps DDP's all-reduce to count bucket reductions; registered once the Trainer has wrapped the model."""

    def __init__(self, trainer: FtguardTrainer) -> None:
        # A weak reference: DDP's reducer (C++) keeps the hook, and through it this callback, alive; a strong one
        # back to the trainer would close a cycle that Python's collector cannot see, so every run's DDP model,
        # and with it the process group, would live on until the interpreter's teardown (where gloo can abort).
        self.trainer, self.count, self.wrapped = weakref.ref(trainer), 0, False

    def on_train_begin(self, args, state, control, **kwargs):
        ddp = self.trainer().model_wrapped
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            raise SystemExit(f"expected a DDP-wrapped model, got {type(ddp).__name__}")

        def hook(process_group, bucket):
            self.count += 1
            return allreduce_hook(process_group, bucket)

        ddp.register_comm_hook(None, hook)
        self.wrapped = True


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def run(method_name: str, method_args: dict, out_dir: str) -> dict:
    stage = "align" if "align" in all_methods()[method_name].stages else "finetune"
    method = get_method(method_name, stage)
    model = tiny_lora_llama()
    start = flat_weights(model).clone()
    args = TrainingArguments(
        output_dir=f"{out_dir}/{method_name}",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GA,
        max_steps=STEPS,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        seed=3,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer_cls = method.trainer_class or FtguardTrainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=rows(16, 1),
        data_collator=collate,
        method_config=method.parse_args(method_args),
        aux_datasets={name: rows(16, 2 + i) for i, name in enumerate(STREAMS)},
    )
    counter = CountReductions(trainer)
    trainer.add_callback(counter)
    trainer.train()
    weights = flat_weights(model)
    gathered = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    return {
        "reductions": counter.count,
        "ranks_identical": all(torch.equal(gathered[0], g) for g in gathered),
        "moved": float((weights - start).norm()),
        "world_size": dist.get_world_size(),
        "logged_keys": sorted({k for entry in trainer.state.log_history for k in entry}),
    }


def ddp_models_alive() -> int:
    """DDP wrappers still alive once the garbage is collected: each one keeps the process group referenced."""
    gc.collect()
    return sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())


def main() -> None:
    out_dir = sys.argv[1]
    report = {}
    for name, args in METHODS.items():
        report[name] = run(name, args, out_dir)
        report[name]["ddp_models_alive_after"] = ddp_models_alive()
    if dist.get_rank() == 0:
        with open(f"{out_dir}/report.json", "w") as f:
            json.dump(report, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
