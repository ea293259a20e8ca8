"""`ftguard bench --generation`: tokens/s of batched greedy generation against one prompt at a time.

Every setting (HF ``generate`` at each batch size, plus vLLM where available) decodes the same prompts — by
default the 64 held-out harmful prompts and 48 new tokens of the demo's HS evaluation. Throughput counts the
new tokens each prompt really got (up to and including its EOS, never the filler after it), over the wall
time of whole ``generate`` calls (tokenization, prefill, decoding, detokenization).

To let drifts of a shared machine hit all settings alike without paying for extra passes, the prompts are
cut into chunks of the largest batch size (in the longest-first order ``generate`` uses, so the batches are
the ones a single call would form) and every setting runs on each chunk in turn, in alternating order
(A B B A ...). One untimed warm-up call per setting comes first.

Greedy outputs should not depend on the batch size, but left padding changes floating-point sums a little
and can flip a near-tie, so the report gives the share of outputs identical to batch size 1 instead of
asserting equality.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from ftguard.errors import FtguardError
from ftguard.schema import check

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm", "auto")
TEMPLATES = ("alpaca", "chat")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("auto", "no", "bf16")
WARMUP_NEW_TOKENS = 4  # enough to go through prefill and the cached decoding path once


@dataclass
class GenerationBenchSpec:
    model: str = "smollm2-135m"
    prompts: int = 64
    max_new_tokens: int = 48  # what the demo's HS evaluation generates
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    backend: Literal["hf", "vllm", "auto"] = "auto"
    warmup: int = 1
    rounds: int = 1
    source: str = "beavertails_refusals"
    split: str = "test"
    root: str = "bundled"
    template: Literal["alpaca", "chat"] = "alpaca"
    response_newline: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "must not be empty")
        check(self.prompts >= 1, "prompts", f"must be ≥ 1, got {self.prompts}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be ≥ 1, got {self.max_new_tokens}")
        check(len(self.batch_sizes) > 0, "batch_sizes", "must list at least one batch size")
        for b in self.batch_sizes:
            ok = isinstance(b, int) and not isinstance(b, bool) and b >= 1
            check(ok, "batch_sizes", f"entries must be integers ≥ 1, got {b!r}")
        check(len(set(self.batch_sizes)) == len(self.batch_sizes), "batch_sizes", "lists a batch size twice")
        # Ratios are to one prompt at a time measured in the same run, so batch size 1 always runs, first.
        self.batch_sizes = [1, *(b for b in self.batch_sizes if b != 1)]
        check(
            self.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
        )
        check(self.warmup >= 0, "warmup", f"must be ≥ 0, got {self.warmup}")
        check(self.rounds >= 1, "rounds", f"must be ≥ 1, got {self.rounds}")
        check(self.template in TEMPLATES, "template", f"must be one of {', '.join(TEMPLATES)}")
        check(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        check(
            self.mixed_precision in MIXED_PRECISION,
            "mixed_precision",
            f"must be one of {', '.join(MIXED_PRECISION)}",
        )
        check(
            self.threads is None or self.threads >= 1, "threads", f"must be ≥ 1 or null, got {self.threads}"
        )


@dataclass
class _Setting:
    name: str
    backend: str
    batch_size: int | None  # None: the backend schedules all prompts of a call itself
    run: Callable[[list[str], int, list[int]], list[str]]


def load_prompts(spec: GenerationBenchSpec, tokenizer) -> list[str]:
    """The first ``spec.prompts`` prompts of the source, formatted as the evaluation formats them."""
    from ftguard.data.sources import load_examples
    from ftguard.data.template import format_prompt
    from ftguard.schema import ConfigError

    examples = load_examples(spec.source, split=spec.split, root=spec.root)
    if spec.prompts > len(examples):
        raise ConfigError(
            f"'prompts' = {spec.prompts} but {spec.source}/{spec.split} has only {len(examples)} prompts"
        )
    return [
        format_prompt(ex, style=spec.template, tokenizer=tokenizer, response_newline=spec.response_newline)
        for ex in examples[: spec.prompts]
    ]


def _hf_setting(model, tokenizer, batch_size: int, **kwargs: Any) -> _Setting:
    from ftguard.evaluation.generate import generate

    def run(prompts: list[str], max_new_tokens: int, counts: list[int]) -> list[str]:
        return generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=False,
            token_counts=counts,
            **kwargs,
        )

    return _Setting(f"hf-{batch_size}", "hf", batch_size, run)


def _vllm_setting(llm, add_special_tokens: bool) -> _Setting:
    from ftguard.evaluation import vllm_backend

    def run(prompts: list[str], max_new_tokens: int, counts: list[int]) -> list[str]:
        return vllm_backend.generate(
            llm,
            prompts,
            max_new_tokens=max_new_tokens,
            add_special_tokens=add_special_tokens,
            token_counts=counts,
        )

    return _Setting("vllm", "vllm", None, run)


def _waste(batches: list[list[int]], lengths: list[int], counts: list[int]) -> tuple[float, float]:
    """Shares of padded prompt positions and of decoding slots spent on rows that had already ended."""
    padded = prompt = slots = used = 0
    for batch in batches:
        padded += len(batch) * max(lengths[i] for i in batch)
        prompt += sum(lengths[i] for i in batch)
        slots += len(batch) * max(counts[i] for i in batch)
        used += sum(counts[i] for i in batch)
    return 1 - prompt / padded, (1 - used / slots) if slots else 0.0


def measure(
    spec: GenerationBenchSpec,
    model,
    tokenizer,
    prompts: list[str],
    *,
    autocast_dtype: torch.dtype | None = None,
    add_special_tokens: bool = True,
    llm=None,
) -> dict[str, Any]:
    """Time every setting on ``prompts`` (see the module docstring); ``llm`` adds a vLLM row."""
    from tqdm.auto import tqdm

    if not prompts:
        raise FtguardError("bench: no prompts to generate from")
    settings = [
        _hf_setting(model, tokenizer, b, autocast_dtype=autocast_dtype, add_special_tokens=add_special_tokens)
        for b in spec.batch_sizes
    ]
    if llm is not None:
        settings.append(_vllm_setting(llm, add_special_tokens))

    n = len(prompts)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    # generate() sorts longest first (stably); chunking in that order keeps its batches whole.
    order = sorted(range(n), key=lambda i: -lengths[i])
    size = max(spec.batch_sizes)
    chunks = [order[s : s + size] for s in range(0, n, size)]

    for _ in range(spec.warmup):
        for s in settings:
            head = prompts[: min(n, s.batch_size or size)]
            s.run(head, min(WARMUP_NEW_TOKENS, spec.max_new_tokens), [])

    times = {s.name: [[0.0] * len(chunks) for _ in range(spec.rounds)] for s in settings}
    outputs = {s.name: [""] * n for s in settings}
    counts = {s.name: [0] * n for s in settings}
    stable = {s.name: True for s in settings}  # same outputs in every round
    step = 0
    with tqdm(total=spec.rounds * len(chunks) * len(settings), desc="generation bench", unit="call") as bar:
        for r in range(spec.rounds):
            for c, chunk in enumerate(chunks):
                for s in settings if step % 2 == 0 else settings[::-1]:
                    got: list[int] = []
                    start = time.perf_counter()
                    texts = s.run([prompts[i] for i in chunk], spec.max_new_tokens, got)
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    times[s.name][r][c] = time.perf_counter() - start
                    for i, text, k in zip(chunk, texts, got, strict=True):
                        if r == 0:
                            outputs[s.name][i], counts[s.name][i] = text, k
                        elif (outputs[s.name][i], counts[s.name][i]) != (text, k):
                            stable[s.name] = False
                    bar.update()
                step += 1

    base = settings[0].name
    rows = []
    for s in settings:
        total_time = sum(map(sum, times[s.name]))
        new_tokens = sum(counts[s.name])
        same = [i for i in range(n) if outputs[s.name][i] == outputs[base][i]]
        row: dict[str, Any] = {
            "name": s.name,
            "backend": s.backend,
            "batch_size": s.batch_size,
            "new_tokens": new_tokens,
            "time_s": total_time / spec.rounds,
            "round_times_s": [sum(t) for t in times[s.name]],
            "chunk_times_s": times[s.name],
            "tokens_per_s": new_tokens * spec.rounds / total_time,
            "mean_new_tokens": new_tokens / n,
            "reached_max_share": sum(k == spec.max_new_tokens for k in counts[s.name]) / n,
            "identical_to_batch1_share": len(same) / n,
            "identical_to_batch1": len(same),
            "differing_prompts": [i for i in range(n) if outputs[s.name][i] != outputs[base][i]],
            "stable_across_rounds": stable[s.name],
            "token_counts": counts[s.name],
        }
        if s.batch_size is not None:
            batches = [
                chunk[j : j + s.batch_size] for chunk in chunks for j in range(0, len(chunk), s.batch_size)
            ]
            row["prompt_padding_share"], row["idle_decode_share"] = _waste(batches, lengths, counts[s.name])
        rows.append(row)
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return {
        "spec": asdict(spec),
        "device": str(getattr(model, "device", "cpu")),
        "threads": torch.get_num_threads(),
        "weights_dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype is not None else None,
        "n_prompts": n,
        "prompt_tokens": {"min": min(lengths), "mean": sum(lengths) / n, "max": max(lengths)},
        "chunk_size": size,
        "outputs_batch1": outputs[base],
        "settings": rows,
    }


def run_generation_bench(spec: GenerationBenchSpec) -> dict[str, Any]:
    """Load the model and prompts of ``spec`` and :func:`measure` (with vLLM as ``spec.backend`` asks)."""
    from ftguard.evaluation import vllm_backend
    from ftguard.models import default_device, load_model, load_tokenizer, resolve_dtype, resolve_model
    from ftguard.pipeline.evaluation import autocast_dtype
    from ftguard.pipeline.results import library_versions

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    use_vllm = spec.backend == "vllm" or (spec.backend == "auto" and vllm_backend.available())
    if spec.backend == "vllm" and not vllm_backend.available():
        raise FtguardError(
            f"bench: backend 'vllm' needs a CUDA GPU and the vllm package ({vllm_backend.INSTALL})"
        )
    model_dir = resolve_model(spec.model)
    tokenizer = load_tokenizer(model_dir)
    device = default_device()
    model = load_model(model_dir, dtype=spec.dtype, device=device)
    prompts = load_prompts(spec, tokenizer)
    llm = None
    if use_vllm:
        # Same weights dtype as the HF rows; the HF copy stays on the GPU, so vLLM must not claim it all.
        dtype = str(resolve_dtype(spec.dtype)).replace("torch.", "")
        llm = vllm_backend.load(model_dir, dtype=dtype, gpu_memory_utilization=0.5)
    report = measure(
        spec,
        model,
        tokenizer,
        prompts,
        autocast_dtype=autocast_dtype(spec.mixed_precision, device),
        add_special_tokens=spec.template != "chat",
        llm=llm,
    )
    return {"model_dir": model_dir, "versions": library_versions(), **report}


def markdown(report: dict[str, Any]) -> str:
    spec = report["spec"]
    precision = report["weights_dtype"] + (f", autocast {report['autocast']}" if report["autocast"] else "")
    lines = [
        f"generation bench: model `{spec['model']}`, {report['n_prompts']} prompts ({spec['source']}/{spec['split']}, "
        f"{report['prompt_tokens']['mean']:.0f} tokens on average), greedy, ≤ {spec['max_new_tokens']} new tokens, "
        f"{report['device']} ({report['threads']} threads), {precision}; {spec['rounds']} round(s) over chunks of "
        f"{report['chunk_size']} prompts, settings interleaved, after {spec['warmup']} warm-up",
        "",
        "| backend | batch | new tokens | time (s) | tokens/s | × batch 1 | same output as batch 1 | prompt padding | idle decode slots |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["settings"]:
        batch = "all" if row["batch_size"] is None else str(row["batch_size"])
        pad = row.get("prompt_padding_share")
        idle = row.get("idle_decode_share")
        lines.append(
            f"| {row['backend']} | {batch} | {row['new_tokens']} | {row['time_s']:.1f} | {row['tokens_per_s']:.1f} "
            f"| {row['speedup']:.2f}× | {100 * row['identical_to_batch1_share']:.0f}% "
            f"({row['identical_to_batch1']}/{report['n_prompts']}) "
            f"| {'–' if pad is None else f'{100 * pad:.0f}%'} | {'–' if idle is None else f'{100 * idle:.0f}%'} |"
        )
    return "\n".join(lines) + "\n"
