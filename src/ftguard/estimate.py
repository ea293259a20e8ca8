"""GPU-hour estimates for ``ftguard sweep --dry-run``: FLOPs counted from a run config, time from a GpuSpec.

A coarse model, good to a factor of about 1.5 (the inputs marked as guesses below dominate the error):

- Training: tokens = optimizer steps × global batch × ``model.max_length`` × ``gpu.token_fill``. FLOPs per token:
  LoRA 4·N (forward 2N + activation gradients 2N; the LoRA weight gradients are negligible), full fine-tuning
  6·N (plus weight gradients 2N), +2·N with gradient checkpointing (one more forward); times the method's pass
  factor relative to SFT (``PASS_FACTORS``). Time = FLOPs / (peak × MFU).
- Generation: prefill is compute-bound (2·N per prompt token at MFU); each decoding step reads every weight once,
  shared by a batch of ``evaluate.batch_size`` sequences: N × bytes per weight / (bandwidth × efficiency), or the
  batch's 2·N FLOPs per sequence when that is slower. Every answer is counted at its full ``max_new_tokens`` (an
  upper bound: a batch stops early only when all its answers end).
- GPU hours = seconds of one GPU's work / 3600, so they do not depend on ``gpu.count`` for a fixed amount of
  work; the wall time is about GPU hours / count.

Not counted: model loading, merging and saving, data preparation, attention's quadratic term (about 1% of the
FLOPs at 256 tokens for a 7B model), KV-cache reads while decoding, and idle time between stages.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftguard.errors import FtguardError
from ftguard.schema import check, from_dict

if TYPE_CHECKING:
    from ftguard.config import RunConfig


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class GpuSpec:
    """The accelerator a sweep is costed on (defaults: one A100-80GB SXM, public datasheet numbers)."""

    name: str = _help("accelerator name, for the printout", default="A100-80GB")
    peak_tflops: float = _help("dense bf16 peak, TFLOPS (A100: 312; H100 SXM: 989)", default=312.0)
    fp32_tflops: float = _help(
        "fp32 peak without TF32, TFLOPS, for stages that compute in fp32 (recovery; A100: 19.5, H100 SXM: 67)",
        default=19.5,
    )
    # Guess: HF Trainer + PEFT LoRA on a 7B model at batch 10 × 256 tokens; published LoRA fine-tuning runs
    # report 30-45% MFU, less at short sequences.
    train_mfu: float = _help(
        "model-FLOPs utilisation reached while training and prefilling (an assumption)", default=0.35
    )
    memory_bandwidth_gbs: float = _help("HBM bandwidth, GB/s (A100-80GB SXM: 2039)", default=2039.0)
    # Guess: transformers' eager `generate` (no CUDA graphs) spends much of a step on kernel launches; vLLM-class
    # engines reach 0.6-0.8.
    decode_efficiency: float = _help(
        "share of the memory bandwidth a decoding step reaches (an assumption)", default=0.3
    )
    count: int = _help("GPUs per run (data parallel): changes wall time, not GPU hours", default=1)
    model_parameters: float | None = _help(
        "parameter count of the run's model; overrides the built-in table (needed for a model it does not know)",
        default=None,
    )
    token_fill: float = _help(
        "share of model.max_length a training batch holds on average (batches are padded to their longest "
        "sample); 1.0 counts every batch as full, an upper bound",
        default=1.0,
    )

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name", "must not be empty")
        for key in ("peak_tflops", "fp32_tflops", "memory_bandwidth_gbs"):
            value = getattr(self, key)
            check(value > 0 and math.isfinite(value), key, f"must be a positive number, got {value}")
        for key in ("train_mfu", "decode_efficiency", "token_fill"):
            value = getattr(self, key)
            check(0 < value <= 1, key, f"must be in (0, 1], got {value}")
        check(self.count >= 1, "count", f"must be ≥ 1, got {self.count}")
        check(
            self.model_parameters is None or self.model_parameters > 0,
            "model_parameters",
            f"must be a positive number or null, got {self.model_parameters}",
        )

    def describe(self) -> str:
        return (
            f"{self.count}× {self.name}, {self.peak_tflops:g} TFLOPS bf16, MFU {self.train_mfu:g}, "
            f"{self.memory_bandwidth_gbs:g} GB/s at {self.decode_efficiency:.0%} while decoding"
        )


def gpu_spec(options: dict[str, Any] | None) -> GpuSpec:
    """The sweep's ``gpu:`` mapping as a validated GpuSpec (an unknown key or a bad value names ``gpu.<key>``)."""
    return from_dict(GpuSpec, options or {}, prefix="gpu")


# ----------------------------------------------------------------------------------------- parameter counts

# Total parameters (embeddings and head included) of the hub models the papers and the presets use, keyed by
# the normalised name (see _normalise). From the models' config.json / safetensors index.
KNOWN_PARAMETERS: dict[str, float] = {
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.02e9,
    "llama-2-70b": 68.98e9,
    "vicuna-7b": 6.74e9,  # Llama-2-7B fine-tune (Vaccine, §2.1)
    "vicuna-13b": 13.02e9,
    "llama-3-8b": 8.03e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.55e9,
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
    "mistral-7b": 7.24e9,  # Lisa (§2.1)
    "qwen2-0.5b": 0.49e9,
    "qwen2-1.5b": 1.54e9,
    "qwen2-7b": 7.62e9,  # Booster Table 4 (§2.1): hidden 3584, 28 layers, vocab 152k untied
    "qwen2.5-0.5b": 0.49e9,
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-3b": 3.09e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-14b": 14.77e9,
    "gemma-2-2b": 2.61e9,
    "gemma-2-9b": 9.24e9,  # Booster Table 4 (§2.1)
    "gemma-2-27b": 27.23e9,
    "opt-125m": 0.125e9,  # Vaccine (§2.1)
    "opt-350m": 0.331e9,
    "opt-1.3b": 1.32e9,
    "opt-2.7b": 2.65e9,
    "opt-6.7b": 6.66e9,
    "opt-13b": 12.85e9,
    "tinyllama-1.1b": 1.10e9,
    "smollm2-135m": 1.35e8,  # the built-in smollm2-135m (SmolLM2-135M-Instruct)
    "smollm2-360m": 3.62e8,
    "smollm2-1.7b": 1.71e9,
    # Judges.
    "beaver-dam-7b": 6.74e9,  # a Llama-7B backbone with a 14-way head (§2.6)
    "llamaguard-7b": 6.74e9,
    "llama-guard-2-8b": 8.03e9,
    "llama-guard-3-8b": 8.03e9,
    "llama-guard-3-1b": 1.50e9,
    "qwen3guard-gen-0.6b": 0.60e9,
    "duoguard-0.5b": 0.49e9,  # a Qwen2.5-0.5B backbone with a 12-way head
}
_SUFFIX = re.compile(r"(-hf|-instruct|-chat|-it|-base|-v\d+(\.\d+)*)$")


def _normalise(name: str) -> str:
    """'meta-llama/Llama-2-7b-chat-hf' → 'llama-2-7b'; 'Qwen/Qwen2.5-7B-Instruct' → 'qwen2.5-7b'."""
    key = name.strip().rstrip("/").split("/")[-1].lower().removeprefix("meta-")
    while True:
        stripped = _SUFFIX.sub("", key)
        if stripped == key:
            return key
        key = stripped


def parameters_from_config(config: dict[str, Any]) -> float:
    """Parameter count of a decoder-only transformer from its HF ``config.json`` fields.

    Attention: q and o are h × (heads·head_dim), k and v h × (kv_heads·head_dim); MLP: gated (three h × i
    matrices, Llama/Mistral/Qwen/Gemma) unless the config names OPT's ``ffn_dim`` (two); embeddings counted
    twice unless tied. Biases and norms are left out (< 0.1%).
    """
    h = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    vocab = config.get("vocab_size")
    if not (h and layers and vocab):
        raise KeyError("hidden_size, num_hidden_layers and vocab_size")
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    head_dim = config.get("head_dim") or h // heads
    kv_heads = config.get("num_key_value_heads") or heads
    attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
    if config.get("ffn_dim"):
        mlp = 2 * h * config["ffn_dim"]
    else:
        mlp = 3 * h * (config.get("intermediate_size") or config.get("n_inner") or 4 * h)
    tied = config.get("tie_word_embeddings", True)
    return float(layers * (attention + mlp) + vocab * h * (1 if tied else 2))


def _tiny_parameters() -> float:
    from ftguard.models import tiny

    return parameters_from_config({**tiny.MODEL_KWARGS, "vocab_size": tiny.VOCAB_SIZE})


def lookup_parameters(name: str) -> float | None:
    """Parameter count of a built-in name, a local model folder with a config.json, or a known hub id."""
    if name == "tiny":
        return _tiny_parameters()
    config_file = Path(name).expanduser() / "config.json"
    if config_file.is_file():
        try:
            return parameters_from_config(json.loads(config_file.read_text(encoding="utf-8")))
        except (KeyError, TypeError, ValueError):
            pass  # an unusual config: the table or the user's gpu.model_parameters decide
    return KNOWN_PARAMETERS.get(_normalise(name))


def model_parameters(run: RunConfig, gpu: GpuSpec | None = None) -> float:
    """Parameter count N of ``run.model.name`` (``gpu.model_parameters`` overrides it)."""
    if gpu is not None and gpu.model_parameters is not None:
        return float(gpu.model_parameters)
    found = lookup_parameters(run.model.name)
    if found is None:
        raise FtguardError(
            f"cannot tell the parameter count of model '{run.model.name}' (not a known hub id, no config.json "
            "in a local folder): add gpu.model_parameters to the sweep, e.g. `gpu: {model_parameters: 7.0e9}`"
        )
    return found


# ----------------------------------------------------------------------------------------- training stages

# FLOPs of one optimizer step relative to SFT on the same batch. One place for every method; each entry says
# where the number comes from (methods.md sections, and README's `ftguard bench` table measured on CPU).
PASS_FACTORS: dict[str, float] = {
    "sft": 1.0,
    # §5: with LoRA, SFT ≈ 2F and Vaccine ≈ 2F + 2F (the first pass's backward needs activation gradients only,
    # and with LoRA that is all a backward costs); bench 1.87× (tiny), 2.15× (SmolLM2).
    "vaccine": 2.0,
    # methods list "1F+1B per step": one pass with Gaussian noise added (§1.2 variants).
    "random_vaccine": 1.0,
    # §1.4 / §5: three full passes (harmful at w, harmful at the probed w, alignment); bench 3.28× / 3.11×.
    "booster": 3.0,
    # §1.4 variants: 4F + 4B (Vaccine's two-pass alignment gradient instead of one pass).
    "booster_vaccine": 4.0,
    # §1.5: an alignment pass, a harmful pass and a readout of every hidden state through the LM head; bench 2.69×
    # on tiny (9.98× on SmolLM2, whose 49k vocabulary makes the readouts dominate; Llama-2's 32k at d 4096 less so).
    "repnoise": 3.0,
    # §1.3 / §5: one pass per step plus an elementwise proximal term; its alignment steps replace user steps,
    # so the step count is SFT's; bench 0.94×.
    "lisa": 1.0,
    "bso": 1.0,
    # §5: one extra forward with the adapters disabled (2F + F over 2F); bench 1.23×.
    "ldifs": 1.5,
    # §5: same extra forward (the teacher); bench 1.82× (the vocabulary-wide fp32 log-softmax, small at 7B).
    "kl": 1.5,
    # §1.5: plain SFT per step; the one-off Fisher pass is added separately (_extra_tokens).
    "ewc": 1.0,
    # §1.5: data mixing only; in `add` mode stage_cost counts the added safety samples as data.
    "vlguard": 1.0,
    # §1.5: + a refusal batch of 4 beside a user batch of 10 (Booster's script): 1 + 4/10; bench 1.39×.
    "vlguard_reg": 1.4,
}
# Guess: a stage without `n` (null = all available) is costed at Booster's alignment size, 4,999 (§2.2).
DEFAULT_ALIGNMENT_N = 4999
# Guesses from the bundled data (chars / 4 + the Alpaca preamble of about 45 tokens, §2.4).
PROMPT_TOKENS = {"harmful": 64, "benign": 64, "sst2": 96, "ag_news": 128, "gsm8k": 128}
# Eval rows per task (§2.7): SST2 validation 872, the first 1000 AG News test rows, GSM8K test 1,319.
TASK_EVAL_ROWS = {"sst2": 872, "ag_news": 1000, "gsm8k": 1319}
# Guess: the first 1000 BeaverTails test prompts (Booster, §2.6) when evaluate.harmful_prompts.n is null.
DEFAULT_HARMFUL_PROMPTS = 1000
XSTEST_SAFE = 250  # XSTest v2 safe prompts (the over-refusal default, n null)
# The judges' input lengths: beaver-dam truncates at 256 tokens (§2.6); Llama Guard's template adds its policy
# (the 14 hazard categories and instructions, about 250 tokens, a guess from the template text).
JUDGE_SPECS = {
    "beaver-dam": {"model": "PKU-Alignment/beaver-dam-7b", "max_input": 256, "overhead": 0, "decode": 0},
    "llama-guard": {"model": "meta-llama/Llama-Guard-3-8B", "max_input": None, "overhead": 250, "decode": 10},
    "llama-guard-1b": {
        "model": "meta-llama/Llama-Guard-3-1B",
        "max_input": None,
        "overhead": 250,
        "decode": 20,
    },
    # Its template writes the policy (about 300 tokens, a guess); a verdict with categories and refusal is ~20 tokens.
    "qwen3guard": {"model": "Qwen/Qwen3Guard-Gen-0.6B", "max_input": None, "overhead": 300, "decode": 20},
    "duoguard": {"model": "DuoGuard/DuoGuard-0.5B", "max_input": 2048, "overhead": 0, "decode": 0},
}
# CPU judges of 22M parameters: seconds for a whole evaluation, nothing next to generation.
FREE_JUDGES = ("keyword", "minilm", "ftguard-judge")


def _stage_config(run: RunConfig, stage: str) -> Any:
    if stage not in ("align", "finetune", "post"):
        raise FtguardError(f"unknown stage '{stage}': use align, finetune or post")
    return getattr(run, stage)


def _method_args(name: str, stage: str, args: dict[str, Any]) -> Any:
    """The method's parsed config: its defaults (from its own module) filled in."""
    from ftguard.methods.registry import get_method

    return get_method(name, stage).parse_args(args, prefix=f"{stage}.args")


def _alignment_n(run: RunConfig) -> tuple[int, str]:
    n = run.data.alignment.n
    if n is not None:
        return n, ""
    return DEFAULT_ALIGNMENT_N, f"data.alignment.n null: guessed {DEFAULT_ALIGNMENT_N} (Booster, §2.2)"


def _tokens_of(train: Any, samples: int, max_length: int, gpu: GpuSpec) -> tuple[int, int]:
    """(optimizer steps, tokens) of one stage: ``max_steps``, else ``epochs`` over ``samples``."""
    if train.max_steps > 0:
        steps = train.max_steps
        micro_batches = steps * train.grad_accum  # per device
    else:
        # Each device reads ceil(samples / (batch · devices)) micro-batches per epoch (the last one partial, counted
        # full); a last incomplete accumulation window still steps the optimizer.
        micro_batches = math.ceil(train.epochs * math.ceil(samples / (train.batch_size * gpu.count)))
        steps = math.ceil(micro_batches / train.grad_accum)
    tokens = round(micro_batches * train.batch_size * gpu.count * max_length * gpu.token_fill)
    return steps, tokens


def _flops_per_token(run: RunConfig, train: Any, n_params: float) -> tuple[float, str]:
    full = run.adapter.topology == "full"
    per_token = (6.0 if full else 4.0) * n_params
    what = "full fine-tuning 6N" if full else "LoRA 4N"
    if train.gradient_checkpointing:
        per_token += 2.0 * n_params
        what += " + 2N (gradient checkpointing)"
    return per_token, what


def _result(seconds: float, tokens: int, flops: float, notes: list[str]) -> dict[str, Any]:
    return {
        "gpu_hours": seconds / 3600.0,
        "tokens": int(tokens),
        "flops": float(flops),
        "assumptions": "; ".join(n for n in notes if n),
    }


def _train_seconds(flops: float, rate_tflops: float, gpu: GpuSpec) -> float:
    return flops / (rate_tflops * 1e12 * gpu.train_mfu)


def _training_rate(train: Any, run: RunConfig, gpu: GpuSpec) -> tuple[float, str]:
    if train.mixed_precision == "no" and run.model.dtype == "float32":
        return gpu.fp32_tflops, "fp32"
    return gpu.peak_tflops, "bf16"


def stage_cost(run: RunConfig, stage: str, gpu: GpuSpec) -> dict[str, Any]:
    """Cost of one align, finetune (one harmful ratio) or post unit of ``run``.

    Returns ``{"gpu_hours", "tokens", "flops", "assumptions"}``.
    """
    cfg = _stage_config(run, stage)
    if cfg is None:
        return _result(0.0, 0, 0.0, [f"{stage} stage is null"])
    n_params = model_parameters(run, gpu)
    if stage == "post":
        return _post_cost(run, cfg, n_params, gpu)

    notes = [f"{run.model.name} N={n_params:.3g}"]
    method, args = cfg.method, cfg.args
    judge_seconds = judge_flops = 0.0
    judge_tokens = 0
    if method == "filter":
        # A judge reads every sample of the upload once, then the inner method trains.
        margs = _method_args(method, stage, args)
        judge_tokens, judge_flops, judge_seconds, note = _judge_pass(
            margs.judge, margs.judge_options, run.data.finetune.n, run.model.max_length, gpu
        )
        notes.append(f"filter: {note}")
        method, args = margs.then, margs.then_args
    factor = PASS_FACTORS.get(method)
    if factor is None:
        factor = 1.0
        notes.append(f"no pass factor for method '{method}': costed as SFT")

    if stage == "align":
        samples, note = _alignment_n(run)
        notes.append(note)
    else:
        samples = run.data.finetune.n
        if method == "vlguard":
            margs = _method_args(method, stage, args)
            if margs.mode == "add":
                samples += margs.safety_samples
                notes.append(f"vlguard adds {margs.safety_samples} safety samples")
    steps, tokens = _tokens_of(cfg.train, samples, run.model.max_length, gpu)
    per_token, what = _flops_per_token(run, cfg.train, n_params)
    flops = tokens * per_token * factor
    extra_tokens, note = _extra_tokens(run, stage, method, args)
    notes.append(note)
    flops += extra_tokens * per_token
    rate, precision = _training_rate(cfg.train, run, gpu)
    seconds = _train_seconds(flops, rate, gpu) + judge_seconds
    notes.append(
        f"{stage} {method}: {steps} steps, {tokens:,} tokens ({samples} samples, max_length "
        f"{run.model.max_length} × fill {gpu.token_fill:g}); {what} FLOPs/token × pass factor {factor:g}; "
        f"{precision} at MFU {gpu.train_mfu:g}"
    )
    return _result(seconds, tokens + extra_tokens + judge_tokens, flops + judge_flops, notes)


def _extra_tokens(run: RunConfig, stage: str, method: str, args: dict[str, Any]) -> tuple[int, str]:
    """One-off passes besides the training steps, in training tokens (forward + backward)."""
    if method == "ewc":
        margs = _method_args(method, stage, args)
        n_align, _ = _alignment_n(run)
        n = n_align if margs.fisher_samples is None else margs.fisher_samples
        return n * run.model.max_length, f"ewc: one Fisher pass over {n} alignment samples"
    return 0, ""


# ----------------------------------------------------------------------------------------- post stage


def _post_cost(run: RunConfig, cfg: Any, n_params: float, gpu: GpuSpec) -> dict[str, Any]:
    method = cfg.method
    margs = _method_args(method, "post", cfg.args)
    notes = [f"{run.model.name} N={n_params:.3g}"]
    n_align, note = _alignment_n(run)
    if method == "antidote":
        # One forward over the harmful calibration pairs for the Wanda scores; the pruning itself is elementwise.
        n = min(margs.n_samples, n_align)
        tokens = n * run.model.max_length
        flops = tokens * 2.0 * n_params
        notes += [note, f"antidote: a forward over {n} calibration samples × {run.model.max_length} tokens"]
        return _result(_train_seconds(flops, gpu.peak_tflops, gpu), tokens, flops, notes)
    if method == "safelora":
        # Projections of the adapted matrices, about d³ each (≈1e13 FLOPs at 7B): seconds.
        flops = 2.0 * n_params * 2048
        notes.append("safelora: weight projections only, counted as a forward over 2048 tokens")
        return _result(_train_seconds(flops, gpu.peak_tflops, gpu), 0, flops, notes)
    if method == "recovery":
        return _recovery_cost(run, margs, n_params, n_align, note, gpu, notes)
    notes.append(f"no cost model for post method '{method}': counted as 0")
    return _result(0.0, 0, 0.0, notes)


def _recovery_cost(
    run: RunConfig, margs: Any, n_params: float, n_align: int, note: str, gpu: GpuSpec, notes: list[str]
) -> dict[str, Any]:
    """Upper bound: the rollback branch (§1.6 schedule) with every checkpoint scored.

    Each recovery step is a forward + backward with full weight gradients (6N per token) over the H harmful
    prompts through the first ``layer_fraction`` of the layers; each rollback step the same over T task prompts;
    two direction forwards (d_harm on A, d_ben on F); FA generation on ``post.validation_n`` task prompts at every
    checkpoint, in the recovery dtype.
    """
    assert run.post is not None
    h = min(margs.n_harmful, n_align)
    t = min(margs.n_task, run.post.validation_n)
    frac = margs.layer_fraction
    prompt = PROMPT_TOKENS["harmful"]
    task_prompt = PROMPT_TOKENS.get(run.data.finetune.task, 96)
    recovery_steps = (
        margs.warmup_steps + margs.steps
    )  # warm-up, then a restart from F when rollback is enabled
    rollback_steps = margs.steps if margs.rollback else 0
    tokens = recovery_steps * h * prompt + rollback_steps * t * task_prompt
    flops = tokens * 6.0 * n_params * frac + (h * prompt + t * task_prompt) * 2.0 * n_params * frac
    fp32 = margs.dtype == "float32"
    seconds = _train_seconds(flops, gpu.fp32_tflops if fp32 else gpu.peak_tflops, gpu)
    checkpoints = math.ceil(recovery_steps / margs.save_every) + 1  # + F's own score
    gen_seconds, gen_tokens, gen_flops = _generation(
        n_params,
        checkpoints * t,
        task_prompt,
        run.evaluate.task_max_new_tokens,
        run.evaluate.batch_size,
        4 if fp32 else 2,
        gpu.fp32_tflops if fp32 else gpu.peak_tflops,
        gpu,
    )
    notes += [
        note,
        f"recovery: {recovery_steps} recovery passes over {h} harmful prompts + {rollback_steps} rollback passes "
        f"over {t} task prompts ({prompt}/{task_prompt} tokens each, guessed), 6N × {frac:.2f} of the layers per "
        f"token, {'fp32' if fp32 else margs.dtype}; FA on {t} prompts at {checkpoints} checkpoints",
    ]
    return _result(seconds + gen_seconds, tokens + gen_tokens, flops + gen_flops, notes)


# ----------------------------------------------------------------------------------------- evaluation


def _generation(
    n_params: float,
    sequences: int,
    prompt_tokens: int,
    new_tokens: int,
    batch_size: int,
    bytes_per_weight: int,
    rate_tflops: float,
    gpu: GpuSpec,
) -> tuple[float, int, float]:
    """(seconds, tokens, FLOPs) of greedy generation: compute-bound prefill, memory-bound decoding."""
    if sequences <= 0:
        return 0.0, 0, 0.0
    prefill_flops = sequences * prompt_tokens * 2.0 * n_params
    rate = rate_tflops * 1e12 * gpu.train_mfu
    batches = math.ceil(sequences / batch_size)
    step_memory = n_params * bytes_per_weight / (gpu.memory_bandwidth_gbs * 1e9 * gpu.decode_efficiency)
    step_compute = 2.0 * n_params * min(batch_size, sequences) / rate
    decode_seconds = batches * new_tokens * max(step_memory, step_compute)
    decode_flops = sequences * new_tokens * 2.0 * n_params
    tokens = sequences * (prompt_tokens + new_tokens)
    return prefill_flops / rate + decode_seconds, tokens, prefill_flops + decode_flops


def _judge_pass(
    judge: str, options: dict[str, Any], answers: int, answer_tokens: int, gpu: GpuSpec
) -> tuple[int, float, float, str]:
    """(tokens, FLOPs, seconds, note) of one judge reading ``answers`` (prompt, answer) pairs."""
    if judge in FREE_JUDGES or answers <= 0:
        return 0, 0.0, 0.0, f"judge {judge}: ≈0"
    spec = JUDGE_SPECS.get(judge)
    if spec is None:
        return 0, 0.0, 0.0, f"judge {judge}: cost unknown, counted as 0"
    model = str(options.get("model", spec["model"]))
    n_params = lookup_parameters(model)
    note = ""
    if n_params is None:
        n_params = KNOWN_PARAMETERS[_normalise(spec["model"])]
        note = f" (size of {model} unknown: counted as {spec['model']})"
    per_input = PROMPT_TOKENS["harmful"] + answer_tokens + spec["overhead"]
    if spec["max_input"]:
        per_input = min(per_input, spec["max_input"])
    flops = answers * per_input * 2.0 * n_params
    seconds = flops / (gpu.peak_tflops * 1e12 * gpu.train_mfu)
    if spec["decode"]:
        batch = int(options.get("batch_size", 8))
        dec_seconds, _, dec_flops = _generation(
            n_params, answers, 0, spec["decode"], batch, 2, gpu.peak_tflops, gpu
        )
        seconds += dec_seconds
        flops += dec_flops
    return (
        answers * per_input,
        flops,
        seconds,
        f"judge {judge} ({n_params:.3g} params){note}: {per_input} tokens/answer",
    )


def eval_cost(run: RunConfig, gpu: GpuSpec) -> dict[str, Any]:
    """Cost of one evaluation point (HS answers + judges, over-refusal answers, task answers) of ``run``."""
    ev = run.evaluate
    n_params = model_parameters(run, gpu)
    bytes_per_weight = 4 if run.model.dtype == "float32" else 2
    fp32 = run.model.dtype == "float32" and ev.mixed_precision == "no"
    rate = gpu.fp32_tflops if fp32 else gpu.peak_tflops
    notes = [f"{run.model.name} N={n_params:.3g}, {bytes_per_weight} bytes/weight"]

    n_harmful = ev.harmful_prompts.n
    if n_harmful is None:
        n_harmful = DEFAULT_HARMFUL_PROMPTS
        notes.append(f"evaluate.harmful_prompts.n null: guessed {n_harmful}")
    parts = [("HS", n_harmful, PROMPT_TOKENS["harmful"], ev.max_new_tokens)]
    if ev.over_refusal_prompts is not None:
        n_benign = ev.over_refusal_prompts.n or XSTEST_SAFE
        parts.append(("over-refusal", n_benign, PROMPT_TOKENS["benign"], ev.over_refusal_max_new_tokens))
    task = run.data.finetune.task
    rows = TASK_EVAL_ROWS.get(task, 1000)
    n_task = rows if ev.task_n is None else min(ev.task_n, rows)
    parts.append((f"FA {task}", n_task, PROMPT_TOKENS.get(task, 96), ev.task_max_new_tokens))

    seconds = flops = 0.0
    tokens = 0
    for what, n, prompt, new in parts:
        s, t, f = _generation(n_params, n, prompt, new, ev.batch_size, bytes_per_weight, rate, gpu)
        seconds, tokens, flops = seconds + s, tokens + t, flops + f
        notes.append(f"{what}: {n} prompts × {new} new tokens at batch {ev.batch_size}")
    for i, judge in enumerate([ev.judge, *ev.extra_judges]):
        options = ev.judge_options if i == 0 else {}
        t, f, s, note = _judge_pass(judge, options, n_harmful, ev.max_new_tokens, gpu)
        seconds, tokens, flops = seconds + s, tokens + t, flops + f
        notes.append(note)
    notes.append(
        f"decoding at {gpu.decode_efficiency:g} of {gpu.memory_bandwidth_gbs:g} GB/s, every answer at full length"
    )
    return _result(seconds, tokens, flops, notes)
