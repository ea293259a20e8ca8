"""Cost primitives for GPU-hour estimates: the accelerator (GpuSpec), parameter counts, and the time of training
FLOPs and of generation. Methods state their own cost with them (``Method.pass_factor``, ``Method.extra_cost``,
``PostMethod.cost``); ``ftguard.estimate`` adds them up per unit of a resolved run. The model and its error are
described there.
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


@dataclass
class ExtraCost:
    """What a method adds to its stage's cost besides ``pass_factor`` × the training FLOPs (``Method.extra_cost``)."""

    samples: int = 0  # training samples added to the stage's own (Vlguard's `add` mode)
    one_off_tokens: int = 0  # forward + backward tokens outside the steps (EWC's Fisher pass)
    judge_reads: list[tuple[str, dict[str, Any], int]] = field(
        default_factory=list
    )  # (judge, options, answers)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- parameter counts

# Total parameters (embeddings and head included) of the hub models the papers and the presets use, keyed by
# the normalised name (see _normalise). From the models' config.json / safetensors index.
KNOWN_PARAMETERS: dict[str, float] = {
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.02e9,
    "llama-2-70b": 68.98e9,
    "vicuna-7b": 6.74e9,  # Llama-2-7B fine-tune (Vaccine; docs/methods.md, Models)
    "vicuna-13b": 13.02e9,
    "llama-3-8b": 8.03e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.55e9,
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
    "mistral-7b": 7.24e9,  # Lisa (docs/methods.md, Models)
    "qwen2-0.5b": 0.49e9,
    "qwen2-1.5b": 1.54e9,
    "qwen2-7b": 7.62e9,  # Booster Table 4: hidden 3584, 28 layers, vocab 152k untied
    "qwen2.5-0.5b": 0.49e9,
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-3b": 3.09e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-14b": 14.77e9,
    "gemma3-270m": 0.268e9,  # built-in (models/gemma3.py): 268,098,176 parameters, tied embeddings
    "gemma-3-270m": 0.268e9,
    "gemma-2-2b": 2.61e9,
    "gemma-2-9b": 9.24e9,  # Booster Table 4 (docs/methods.md, Models)
    "gemma-2-27b": 27.23e9,
    "opt-125m": 0.125e9,  # Vaccine (docs/methods.md, Models)
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
    "beaver-dam-7b": 6.74e9,  # a Llama-7B backbone with a 14-way head (docs/methods.md, Harmful score)
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

# Guess: a stage without `n` (null = all available) is costed at Booster's alignment size, 4,999 records.
DEFAULT_ALIGNMENT_N = 4999
# Guesses from the bundled data (chars / 4 + the Alpaca preamble of about 45 tokens).
PROMPT_TOKENS = {"harmful": 64, "benign": 64, "sst2": 96, "ag_news": 128, "gsm8k": 128}
# Eval rows per task: SST2 validation 872, the first 1000 AG News test rows, GSM8K test 1,319.
TASK_EVAL_ROWS = {"sst2": 872, "ag_news": 1000, "gsm8k": 1319}
# Guess: the first 1000 BeaverTails test prompts (Booster) when evaluate.harmful_prompts.n is null.
DEFAULT_HARMFUL_PROMPTS = 1000
ALPACA_EVAL_PROMPTS = 805  # AlpacaEval's instructions (the instruction-refusal set, n null)
XSTEST_SAFE = 250  # XSTest v2 safe prompts (the over-refusal default, n null)
# The judges' input lengths: beaver-dam truncates at 256 tokens; Llama Guard's template adds its policy
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


def alignment_n(run: RunConfig) -> tuple[int, str]:
    n = run.data.alignment.n
    if n is not None:
        return n, ""
    return DEFAULT_ALIGNMENT_N, f"data.alignment.n null: guessed {DEFAULT_ALIGNMENT_N} (Booster)"


def cost_result(seconds: float, tokens: int, flops: float, notes: list[str]) -> dict[str, Any]:
    return {
        "gpu_hours": seconds / 3600.0,
        "tokens": int(tokens),
        "flops": float(flops),
        "assumptions": "; ".join(n for n in notes if n),
    }


def train_seconds(flops: float, rate_tflops: float, gpu: GpuSpec) -> float:
    return flops / (rate_tflops * 1e12 * gpu.train_mfu)


# ----------------------------------------------------------------------------------------- evaluation


def generation(
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


def judge_pass(
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
        dec_seconds, _, dec_flops = generation(
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
