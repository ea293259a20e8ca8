"""GPU-hour estimates (ftguard.estimate): the formulas against hand computations, and the config checks.

Nothing here loads a model or data: the estimate reads the resolved run (config and method instances).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from ftguard.config import config_from_dict, set_keys
from ftguard.cost import (
    KNOWN_PARAMETERS,
    GpuSpec,
    gpu_spec,
    lookup_parameters,
    model_parameters,
    parameters_from_config,
)
from ftguard.errors import FtguardError
from ftguard.estimate import eval_cost, stage_cost
from ftguard.methods.booster import Booster
from ftguard.resolve import ResolvedRun, resolve_run
from ftguard.schema import ConfigError

N = 1.0e9  # the model size every hand computation uses (gpu.model_parameters)
A100 = {"peak": 312e12, "mfu": 0.35, "bandwidth": 2039e9, "efficiency": 0.3}


def run_config(**settings: Any) -> ResolvedRun:
    """A small run: LoRA, 128 tokens, SFT with max_steps; ``settings`` are dotted config paths."""
    data = {
        "model": {"name": "meta-llama/Llama-2-7b-hf", "max_length": 128},
        "data": {"alignment": {"n": 400}, "finetune": {"n": 1000, "harmful_ratio": 0.1}},
        "align": {"method": "sft", "train": {"max_steps": 100, "batch_size": 8, "grad_accum": 2}},
        "finetune": {"method": "sft", "train": {"max_steps": 50, "batch_size": 8}},
        "evaluate": {
            "judge": "keyword",
            "harmful_prompts": {"source": "beavertails_refusals", "split": "test", "n": 32},
            "over_refusal_prompts": None,
            "max_new_tokens": 100,
            "task_n": 16,
            "task_max_new_tokens": 10,
            "batch_size": 16,
        },
    }
    return resolve_run(config_from_dict(set_keys(data, [(k.split("."), v, k) for k, v in settings.items()])))


def gpu(**options: Any) -> GpuSpec:
    return gpu_spec({"model_parameters": N, **options})


# ----------------------------------------------------------------------------------------- training stages


def test_sft_lora_stage_with_max_steps_matches_the_hand_computation():
    cost = stage_cost(run_config(), "align", gpu())
    tokens = 100 * 8 * 2 * 128  # steps × batch × grad_accum × max_length
    flops = tokens * 4 * N  # LoRA: forward 2N + activation gradients 2N
    assert cost["tokens"] == tokens
    assert cost["flops"] == pytest.approx(flops)
    assert cost["gpu_hours"] == pytest.approx(flops / (A100["peak"] * A100["mfu"]) / 3600)
    assert "LoRA 4N" in cost["assumptions"] and "100 steps" in cost["assumptions"]


def test_full_fine_tuning_costs_6n_per_token_and_checkpointing_adds_a_forward():
    lora = stage_cost(run_config(), "finetune", gpu())["flops"]
    full = stage_cost(run_config(**{"adapter.topology": "full"}), "finetune", gpu())["flops"]
    checkpointed = stage_cost(
        run_config(**{"adapter.topology": "full", "finetune.train.gradient_checkpointing": True}),
        "finetune",
        gpu(),
    )["flops"]
    assert full == pytest.approx(lora * 6 / 4)
    assert checkpointed == pytest.approx(lora * 8 / 4)


def test_booster_costs_its_pass_factor_times_sft_with_everything_else_equal():
    same = {"adapter.topology": "single"}  # Booster needs it; SFT gets it too so only the method differs
    sft = stage_cost(run_config(**same), "align", gpu())
    booster = stage_cost(run_config(**same, **{"align.method": "booster"}), "align", gpu())
    assert Booster.pass_factor == 3.0  # 3F + 3B per step
    assert booster["tokens"] == sft["tokens"]
    assert booster["gpu_hours"] == pytest.approx(3.0 * sft["gpu_hours"])
    assert booster["flops"] == pytest.approx(3.0 * sft["flops"])


def test_epochs_count_every_sample_of_each_epoch():
    cfg = run_config(**{"align.train.max_steps": -1, "align.train.epochs": 3, "align.train.grad_accum": 1})
    cost = stage_cost(cfg, "align", gpu())
    # 400 alignment samples, batch 8: ceil(400/8) = 50 batches per epoch, 3 epochs.
    assert cost["tokens"] == 3 * 50 * 8 * 128
    assert "150 steps" in cost["assumptions"]


def test_more_gpus_change_wall_time_not_gpu_hours_for_the_same_samples():
    epochs = {"align.train.max_steps": -1, "align.train.epochs": 2, "align.train.grad_accum": 1}
    cfg = run_config(**epochs, **{"align.train.batch_size": 10})
    one = stage_cost(cfg, "align", gpu(count=1))
    two = stage_cost(cfg, "align", gpu(count=2))
    assert one["tokens"] == two["tokens"] == 2 * 400 * 128
    assert two["gpu_hours"] == pytest.approx(one["gpu_hours"])
    # The batch size is per device: two GPUs take half the optimizer steps for the same samples.
    assert "80 steps" in one["assumptions"] and "40 steps" in two["assumptions"]
    assert eval_cost(cfg, gpu(count=2))["gpu_hours"] == pytest.approx(
        eval_cost(cfg, gpu(count=1))["gpu_hours"]
    )


def test_max_steps_with_more_gpus_is_more_samples():
    # max_steps fixes optimizer steps of a per-device batch: two GPUs see twice the samples.
    one = stage_cost(run_config(), "align", gpu(count=1))
    two = stage_cost(run_config(), "align", gpu(count=2))
    assert two["gpu_hours"] == pytest.approx(2 * one["gpu_hours"])


def test_vlguard_add_mode_trains_on_the_added_safety_samples_too():
    epochs = {"finetune.train.max_steps": -1, "finetune.train.epochs": 1, "finetune.train.batch_size": 10}
    sft = stage_cost(run_config(**epochs), "finetune", gpu())
    vlguard = stage_cost(run_config(**epochs, **{"finetune.method": "vlguard"}), "finetune", gpu())
    assert vlguard["tokens"] == sft["tokens"] * (1000 + 100) // 1000  # 100 safety samples on top of n


def test_an_unset_alignment_size_is_a_documented_guess():
    cost = stage_cost(run_config(**{"data.alignment.n": None}), "align", gpu())
    assert "guessed 4999" in cost["assumptions"]


def test_a_skipped_stage_costs_nothing():
    cost = stage_cost(run_config(**{"align": None, "evaluate.points": ["base", "finetune"]}), "align", gpu())
    assert cost["gpu_hours"] == 0 and cost["tokens"] == 0


# ----------------------------------------------------------------------------------------- post stage


def test_antidote_is_one_forward_over_its_calibration_samples():
    cfg = run_config(**{"post": {"method": "antidote"}})
    cost = stage_cost(cfg, "post", gpu())
    # n_samples 2000 by default, capped by the 400 alignment (calibration) records.
    assert cost["flops"] == pytest.approx(400 * 128 * 2 * N)


def test_recovery_in_fp32_costs_more_than_in_bf16():
    fp32 = stage_cost(run_config(**{"post": {"method": "recovery"}}), "post", gpu())
    bf16 = stage_cost(
        run_config(**{"post": {"method": "recovery", "args": {"dtype": "bfloat16"}}}), "post", gpu()
    )
    assert fp32["flops"] > bf16["flops"] * 0.99  # the same work...
    assert fp32["gpu_hours"] > 5 * bf16["gpu_hours"]  # ...at 19.5 instead of 312 TFLOPS


# ----------------------------------------------------------------------------------------- evaluation


def test_eval_cost_matches_the_hand_computation():
    cost = eval_cost(run_config(), gpu())
    step = N * 2 / (A100["bandwidth"] * A100["efficiency"])  # bf16 weights read once per decoding step
    decode = (2 * 100 + 1 * 10) * step  # HS: 32 prompts = 2 batches × 100 steps; FA: 16 prompts = 1 × 10
    prefill = (32 * 64 + 16 * 96) * 2 * N / (A100["peak"] * A100["mfu"])
    assert cost["gpu_hours"] == pytest.approx((decode + prefill) / 3600)
    assert cost["tokens"] == 32 * (64 + 100) + 16 * (96 + 10)


def test_a_7b_judge_adds_a_forward_per_answer():
    keyword = eval_cost(run_config(), gpu())
    beaver = eval_cost(run_config(**{"evaluate.judge": "beaver-dam"}), gpu())
    judge_flops = 32 * 164 * 2 * 6.74e9  # 32 answers of 64 + 100 tokens (under beaver-dam's 256 limit)
    assert beaver["flops"] - keyword["flops"] == pytest.approx(judge_flops)
    guard = eval_cost(run_config(**{"evaluate.judge": "llama-guard"}), gpu())
    assert guard["gpu_hours"] > beaver["gpu_hours"]  # 8B, its policy text and a short generation


def test_a_float32_model_reads_twice_the_bytes_per_decoding_step():
    bf16 = eval_cost(run_config(), gpu(peak_tflops=1e6))  # prefill made free: decoding only
    fp32 = eval_cost(run_config(**{"model.dtype": "float32"}), gpu(peak_tflops=1e6))
    assert fp32["gpu_hours"] == pytest.approx(2 * bf16["gpu_hours"], rel=1e-3)


# ----------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("meta-llama/Llama-2-7b-hf", 6.74e9),
        ("meta-llama/Llama-2-7b-chat-hf", 6.74e9),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", 8.03e9),
        ("meta-llama/Llama-3.1-8B-Instruct", 8.03e9),
        ("Qwen/Qwen2.5-7B-Instruct", 7.62e9),
        ("google/gemma-2-9b", 9.24e9),
        ("mistralai/Mistral-7B-Instruct-v0.2", 7.24e9),
        ("facebook/opt-6.7b", 6.66e9),
        ("smollm2-135m", 1.35e8),
    ],
)
def test_known_models(name, expected):
    assert lookup_parameters(name) == expected


def test_config_json_formula_agrees_with_the_table():
    # Published configs of two models in the table (hidden, layers, heads, kv heads, MLP, vocab, tied).
    llama2 = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    llama2 |= dict(intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False)
    qwen2 = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)
    qwen2 |= dict(intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)
    assert parameters_from_config(llama2) == pytest.approx(KNOWN_PARAMETERS["llama-2-7b"], rel=0.01)
    assert parameters_from_config(qwen2) == pytest.approx(KNOWN_PARAMETERS["qwen2-7b"], rel=0.01)


def test_a_local_folder_is_counted_from_its_config_json(tmp_path):
    config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    # 2 layers × (4·64² attention + 3·64·128 MLP) + 100·64 tied embeddings
    assert lookup_parameters(str(tmp_path)) == 2 * (4 * 64 * 64 + 3 * 64 * 128) + 100 * 64


def test_the_tiny_model_is_counted_from_its_build_recipe():
    n = lookup_parameters("tiny")
    assert n is not None and 1e5 < n < 1e6


def test_an_unknown_model_needs_gpu_model_parameters():
    cfg = run_config(**{"model.name": "my-org/mystery-model-7b"})
    with pytest.raises(FtguardError, match=r"gpu\.model_parameters"):
        stage_cost(cfg, "align", gpu_spec({}))
    assert model_parameters(cfg.config, gpu_spec({"model_parameters": 7e9})) == 7e9


# ----------------------------------------------------------------------------------------- GpuSpec


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_mfu": 1.5}, "'gpu.train_mfu' must be in (0, 1]"),
        ({"decode_efficiency": 0}, "'gpu.decode_efficiency' must be in (0, 1]"),
        ({"count": 0}, "'gpu.count' must be ≥ 1"),
        ({"peak_tflops": -1}, "'gpu.peak_tflops' must be a positive number"),
        ({"model_parameters": 0}, "'gpu.model_parameters' must be a positive number or null"),
        ({"count": "two"}, "'gpu.count' must be an integer"),
        ({"mfu": 0.3}, "unknown key 'gpu.mfu'"),
    ],
)
def test_a_bad_gpu_value_names_the_field(options, message):
    with pytest.raises(ConfigError) as err:
        gpu_spec(options)
    assert message in str(err.value)


def test_gpu_spec_defaults_and_description():
    spec = gpu_spec({})
    assert (spec.name, spec.peak_tflops, spec.memory_bandwidth_gbs, spec.count) == (
        "A100-80GB",
        312.0,
        2039.0,
        1,
    )
    assert spec.describe().startswith("1× A100-80GB, 312 TFLOPS bf16, MFU 0.35")
    assert math.isclose(gpu_spec({"count": 4, "name": "H100"}).count, 4)
