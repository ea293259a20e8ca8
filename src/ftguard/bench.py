"""`ftguard bench`: step time and peak memory of training methods, as ratios to SFT.

Time: every method trains its own fresh copy of the same model on the same fixed-length batches; after
warm-up, rounds of steps are interleaved across methods (A B C A B C ...) so that drifts of the machine hit
every method alike; the mean step time covers the method's whole step (all passes + optimizer).
Memory: the peak above the level reached once libraries, data and the base weights are loaded, i.e. the
trained model copy + activations + gradients + optimizer state. On CUDA, ``torch.cuda.max_memory_allocated``;
on CPU each method runs in a fresh subprocess and reports its peak resident memory, sampled every 2 ms.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftguard.errors import FtguardError

log = logging.getLogger(__name__)


@dataclass
class BenchSpec:
    methods: list[str]
    model: str = "tiny"
    batch_size: int = 8
    seq_len: int = 128
    warmup: int = 2
    steps: int = 5  # measured steps per round
    rounds: int = 3
    topology: str = "double"
    lora_r: int = 8
    lora_alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    seed: int = 43

    def __post_init__(self) -> None:
        if "sft" not in self.methods:
            self.methods = ["sft", *self.methods]  # ratios are to SFT measured in the same run
        if min(self.batch_size, self.seq_len, self.steps, self.rounds) < 1 or self.warmup < 0:
            raise FtguardError("bench: batch size, sequence length, steps and rounds must be ≥ 1, warmup ≥ 0")


def _run_config(spec: BenchSpec):
    from ftguard.config import config_from_dict

    lora = {"r": spec.lora_r, "alpha": spec.lora_alpha, "dropout": 0.0, "target_modules": spec.targets}
    n = 8 * spec.batch_size
    return config_from_dict(
        {
            "name": "bench",
            "seed": spec.seed,
            "model": {"name": spec.model, "max_length": spec.seq_len},
            "adapter": {"topology": spec.topology, "align": lora, "finetune": lora},
            "data": {"alignment": {"response": "safe", "n": n}, "finetune": {"n": n, "harmful_ratio": 0.1}},
            "evaluate": {
                "points": [],
                "judge": "keyword",
                "harmful_prompts": {"split": "test", "n": 8},
                "task_n": 8,
            },
        }
    )


def method_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value:key=value`` → (name, args): a method timed with some args changed (values read as YAML),
    e.g. ``repnoise:readout=sampled``. The report keeps the whole spec as the row's name."""
    import yaml

    name, *pairs = spec.split(":")
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FtguardError(f"bench: '{spec}': write a method variant as name:key=value[:key=value]")
        args[key] = yaml.safe_load(value)
    return name, args


def check_methods(specs: list[str]) -> None:
    """Every name known and every variant's args valid, before any model is loaded."""
    from ftguard.methods.registry import all_methods

    known = all_methods()
    variants = [method_variant(spec) for spec in specs]
    unknown = [spec for spec, (name, _) in zip(specs, variants, strict=True) if name not in known]
    if unknown:
        raise FtguardError(f"bench: unknown method(s) {', '.join(unknown)} (see `ftguard methods`)")
    for spec, (name, args) in zip(specs, variants, strict=True):
        known[name].parse_args({**known[name].bench_args, **args}, prefix=f"bench {spec}")


class _Fixture:
    """The shared pieces: data plan, tokenizer, base weights and fixed-length batches."""

    def __init__(self, spec: BenchSpec) -> None:
        from ftguard.data.collate import CausalLMCollator
        from ftguard.data.plan import build_data_plan
        from ftguard.models import load_model, load_tokenizer, resolve_model

        self.spec = spec
        self.run = _run_config(spec)
        self.plan = build_data_plan(self.run, roles=("alignment",))
        self.model_dir = resolve_model(spec.model)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.base = load_model(self.model_dir)
        self.collator = CausalLMCollator.from_tokenizer(self.tokenizer)

    def tokenize(self, examples):
        from ftguard.data.template import tokenize_dataset

        dataset, _ = tokenize_dataset(examples, self.tokenizer, max_length=self.spec.seq_len)
        return dataset

    def fixed_batch(self, dataset, offset: int) -> dict[str, torch.Tensor]:
        """``batch_size`` rows padded to exactly ``seq_len`` tokens, so every method sees the same work."""
        rows = [dataset[(offset + i) % len(dataset)] for i in range(self.spec.batch_size)]
        batch = self.collator(rows)
        pad = self.spec.seq_len - batch["input_ids"].shape[1]
        if pad > 0:
            batch["input_ids"] = torch.nn.functional.pad(
                batch["input_ids"], (0, pad), value=self.collator.pad_token_id
            )
            batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, pad), value=0)
            batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, pad), value=-100)
        return batch

    def method(self, name: str):
        """The method as a run resolves it: the bench config with ``name`` in its stage and its ``bench_args``."""
        from ftguard.config import config_from_dict
        from ftguard.methods.registry import all_methods
        from ftguard.resolve import resolve_run

        known = all_methods()
        name, variant = method_variant(name)
        stage = "align" if name not in known or "align" in known[name].stages else "finetune"
        data = self.run.to_dict()
        bench_args = dict(known[name].bench_args) if name in known else {}
        data[stage] = {**data[stage], "method": name, "args": {**bench_args, **variant}}
        if stage == "align":
            data["finetune"] = None  # one stage is timed: no fine-tuning topology for it to object to
        return stage, resolve_run(config_from_dict(data)).method(stage)

    def trainer(self, method_name: str, out_dir: Path):
        from transformers import TrainingArguments

        from ftguard.methods.context import StageContext
        from ftguard.models import add_lora
        from ftguard.training.arguments import mixed_precision_flags

        torch.manual_seed(self.spec.seed)
        model = copy.deepcopy(self.base)
        if self.spec.topology == "full":
            model.requires_grad_(True)
        else:
            model = add_lora(model, self.run.adapter.align)
        stage, method = self.method(method_name)
        dataset = self.tokenize(self.plan.alignment)
        args = TrainingArguments(
            output_dir=str(out_dir),
            per_device_train_batch_size=self.spec.batch_size,
            max_steps=10**6,
            learning_rate=1e-4,
            report_to="none",
            save_strategy="no",
            seed=self.spec.seed,
            **mixed_precision_flags("auto"),
        )
        ctx = StageContext(
            run=self.run,
            stage=stage,
            key="bench",
            model=model,
            tokenizer=self.tokenizer,
            train_dataset=dataset,
            plan=self.plan,
            tokenize=self.tokenize,
            out_dir=out_dir,
        )
        trainer = method.create_trainer(
            ctx, model=model, args=args, train_dataset=dataset, data_collator=self.collator
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
        return trainer, dataset


def _step(trainer, batch) -> float:
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    if trainer.args.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(
            [p for p in trainer.model.parameters() if p.requires_grad], trainer.args.max_grad_norm
        )
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    # As the Trainer's loop does: methods on a step schedule (Booster's refresh_every, T-Vaccine's draws) must see
    # the steps go by, or every timed step would be their first.
    trainer.state.global_step += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_time(spec: BenchSpec, out_dir: Path) -> dict[str, dict[str, Any]]:
    from tqdm.auto import tqdm

    fixture = _Fixture(spec)
    trainers = {m: fixture.trainer(m, out_dir / m) for m in spec.methods}
    times: dict[str, list[float]] = {m: [] for m in spec.methods}
    total = len(spec.methods) * (spec.warmup + spec.steps * spec.rounds)
    with tqdm(total=total, desc="bench", unit="step") as bar:
        for trainer, dataset in trainers.values():
            for i in range(spec.warmup):
                _step(trainer, fixture.fixed_batch(dataset, i * spec.batch_size))
                bar.update()
        for r in range(spec.rounds):
            for m, (trainer, dataset) in trainers.items():
                for i in range(spec.steps):
                    times[m].append(
                        _step(trainer, fixture.fixed_batch(dataset, (r * spec.steps + i) * spec.batch_size))
                    )
                    bar.update()
    return {
        m: {
            "step_time_s": statistics.mean(ts),
            "step_time_stdev_s": statistics.stdev(ts) if len(ts) > 1 else 0.0,
            "steps": len(ts),
            # The mean is the amortised cost a schedule (refresh_every) pays; the steps themselves show whether
            # one of them was slowed by something else on the machine.
            "step_times_s": [round(t, 4) for t in ts],
        }
        for m, ts in times.items()
    }


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no procfs (macOS): the lifetime peak is the best available
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def memory_of(spec: BenchSpec, method: str, out_dir: Path) -> int:
    """Peak training memory of one method (bytes), measured in this process: use a fresh process on CPU.

    Counted: the trained copy of the model, adapters, activations, gradients and optimizer state. Not
    counted: libraries, data and the shared base weights the copy is made from (loaded before the baseline).
    """
    fixture = _Fixture(spec)
    gc.collect()
    baseline = _current_rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    with _RssSampler() as sampler:
        trainer, dataset = fixture.trainer(method, out_dir / method)
        batches = [fixture.fixed_batch(dataset, i * spec.batch_size) for i in range(max(spec.warmup, 1) + 1)]
        for batch in batches:
            _step(trainer, batch)
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()) - baseline
    return sampler.peak - baseline


class _RssSampler:
    """Peak current RSS over a block, sampled every 2 ms: ru_maxrss can't be reset after loading peaks."""

    def __init__(self, interval: float = 0.002) -> None:
        import threading

        self.interval, self.peak = interval, _current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _current_rss_bytes())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss_bytes())


def measure_memory(spec: BenchSpec, out_dir: Path) -> dict[str, int]:
    result = {}
    for method in spec.methods:
        if torch.cuda.is_available():
            result[method] = memory_of(spec, method, out_dir)
            continue
        payload = json.dumps({**spec.__dict__, "methods": [method]})
        proc = subprocess.run(
            [sys.executable, "-m", "ftguard.bench", payload, str(out_dir)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise FtguardError(
                f"bench: memory measurement of '{method}' failed: {proc.stderr.strip().splitlines()[-1:]}"
            )
        result[method] = int(proc.stdout.strip().splitlines()[-1])
    return result


def run_bench(spec: BenchSpec, out_dir: Path, *, memory: bool = True) -> dict[str, Any]:
    from ftguard.pipeline.results import library_versions

    timing = measure_time(spec, out_dir)
    peaks = measure_memory(spec, out_dir) if memory else {}
    sft_time, sft_mem = timing["sft"]["step_time_s"], peaks.get("sft")
    methods = {}
    for m in spec.methods:
        entry = {**timing[m], "time_ratio": timing[m]["step_time_s"] / sft_time}
        if peaks:
            entry["peak_memory_bytes"] = peaks[m]
            entry["memory_ratio"] = peaks[m] / sft_mem if sft_mem else None
        methods[m] = entry
    return {
        "spec": spec.__dict__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "memory_method": "cuda max_memory_allocated"
        if torch.cuda.is_available()
        else "peak RSS of a fresh process above its level once libraries, data and base weights are loaded",
        "versions": library_versions(),
        "methods": methods,
    }


def markdown(report: dict[str, Any]) -> str:
    spec = report["spec"]
    lines = [
        f"bench: model `{spec['model']}`, batch {spec['batch_size']} × {spec['seq_len']} tokens, {spec['topology']} LoRA r{spec['lora_r']}, "
        f"{report['device']} ({report['threads']} threads), {spec['rounds']}×{spec['steps']} interleaved steps after {spec['warmup']} warm-up",
        "",
        "| method | step time (s) | time / SFT | peak memory (MiB) | memory / SFT |",
        "|---|---|---|---|---|",
    ]
    for m, e in report["methods"].items():
        mem, ratio = e.get("peak_memory_bytes"), e.get("memory_ratio")
        mem_cell = "–" if mem is None else f"{mem / 2**20:.0f}"
        ratio_cell = "–" if ratio is None else f"{ratio:.2f}×"
        lines.append(
            f"| {m} | {e['step_time_s']:.3f} ± {e['step_time_stdev_s']:.3f} | {e['time_ratio']:.2f}× | {mem_cell} | {ratio_cell} |"
        )
    return "\n".join(lines) + "\n"


def _worker(argv: list[str]) -> None:
    """Subprocess entry: measure one method's memory and print the bytes."""
    data = json.loads(argv[0])
    spec = BenchSpec(**{k: v for k, v in data.items() if k != "methods"}, methods=data["methods"])
    method = data["methods"][0]
    print(memory_of(spec, method, Path(argv[1])))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _worker(sys.argv[1:])
