"""`ftguard bench --generation`: exact token counts, outputs, report arithmetic, spec checks, vLLM backend.

No assertion on timings: they belong to the benchmark, not to the tests.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from transformers import GenerationConfig

from ftguard import cli
from ftguard.bench_generation import (
    GenerationBenchSpec,
    load_prompts,
    markdown,
    measure,
    run_generation_bench,
)
from ftguard.errors import FtguardError
from ftguard.evaluation import vllm_backend
from ftguard.evaluation.generate import count_new_tokens, generate
from ftguard.schema import ConfigError, from_dict
from tiny import peaked_llama, word_tokenizer

PAD, BOS, EOS = 0, 1, 2
PROMPTS = [
    "the cat sat",
    "what is the red house on the green tree",
    "dog",
    "how do the blue sky and the slow cat ran fast",
    "why are",
    "a dog ran on the mat",
    "is the sky blue",
]
MAX_NEW = 8


def alone(model, tokenizer, prompt: str, eos: list[int]) -> list[int]:
    """New token ids of one unpadded prompt: with a batch of one, generation stops right after EOS."""
    encoded = tokenizer(prompt, return_tensors="pt")
    config = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    with torch.inference_mode():
        out = model.generate(**encoded, generation_config=config)
    return out[0, encoded["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def setup():
    """Tiny model whose EOS list includes a word it emits mid-answer for some prompts but not all."""
    tokenizer = word_tokenizer()
    model = peaked_llama(len(tokenizer)).eval()
    runs = [alone(model, tokenizer, p, [EOS]) for p in PROMPTS]
    words = sorted({t for ids in runs for t in ids} - {PAD, BOS, EOS})
    stopper = next(t for t in words if 0 < sum(t in ids[: MAX_NEW - 1] for ids in runs) < len(runs))
    model.generation_config.eos_token_id = [EOS, stopper]
    return model, tokenizer, [EOS, stopper]


def small_spec(**kwargs) -> GenerationBenchSpec:
    values = {"model": "in-memory", "prompts": len(PROMPTS), "max_new_tokens": MAX_NEW, "batch_sizes": [1, 3]}
    return GenerationBenchSpec(**{**values, "warmup": 0, **kwargs})


def test_count_stops_at_the_first_eos_and_ignores_pad_ids():
    rows = torch.tensor(
        [
            [5, PAD, 7, EOS, PAD, PAD],  # the model emitted the pad id as a word: it counts
            [5, 6, 7, 8, 9, 10],  # no EOS: every step counts
            [EOS, EOS, EOS, EOS, EOS, EOS],  # pad == EOS (SmolLM2): only the first is generated
            [5, 9, EOS, 4, EOS, PAD],
        ]
    )
    assert count_new_tokens(rows, [EOS]) == [4, 6, 1, 3]
    assert count_new_tokens(rows, [EOS, 9]) == [4, 5, 1, 2]
    assert count_new_tokens(rows, []) == [6, 6, 6, 6]


def test_token_counts_are_exact(setup):
    model, tokenizer, eos = setup
    expected = [len(alone(model, tokenizer, p, eos)) for p in PROMPTS]
    assert min(expected) < MAX_NEW and max(expected) == MAX_NEW  # both ways of ending are exercised

    counts: list[int] = []
    generate(
        model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW, batch_size=3, progress=False, token_counts=counts
    )
    assert counts == expected

    report = measure(small_spec(), model, tokenizer, PROMPTS)
    for row in report["settings"]:
        assert row["token_counts"] == expected
        assert row["new_tokens"] == sum(expected)
        assert row["reached_max_share"] == expected.count(MAX_NEW) / len(PROMPTS)


def test_batch1_outputs_equal_plain_generate(setup):
    model, tokenizer, _ = setup
    report = measure(small_spec(batch_sizes=[3, 1]), model, tokenizer, PROMPTS)
    plain = generate(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW, batch_size=1, progress=False)
    assert report["outputs_batch1"] == plain
    assert sum(bool(t) for t in plain) >= 4  # not a comparison of empty strings
    assert [r["batch_size"] for r in report["settings"]] == [1, 3]
    assert report["settings"][1]["identical_to_batch1_share"] == 1.0
    assert report["settings"][1]["differing_prompts"] == []


def test_report_ratio_is_computed_from_the_measured_numbers(setup):
    model, tokenizer, _ = setup
    report = measure(small_spec(batch_sizes=[1, 4], rounds=2, warmup=1), model, tokenizer, PROMPTS)
    rows = report["settings"]
    assert report["chunk_size"] == 4 and len(rows) == 2
    for row in rows:
        times = row["chunk_times_s"]
        assert len(times) == 2 and all(len(r) == 2 and all(t > 0 for t in r) for r in times)  # 7 prompts / 4
        total = sum(map(sum, times))
        assert row["round_times_s"] == pytest.approx([sum(r) for r in times])
        assert row["time_s"] == pytest.approx(total / 2)
        assert row["tokens_per_s"] == pytest.approx(2 * row["new_tokens"] / total)
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / rows[0]["tokens_per_s"])
        assert row["stable_across_rounds"]
    assert rows[0]["speedup"] == 1.0
    assert rows[0]["prompt_padding_share"] == 0.0 and rows[0]["idle_decode_share"] == 0.0
    assert 0 < rows[1]["prompt_padding_share"] < 1 and 0 < rows[1]["idle_decode_share"] < 1
    table = markdown(report)
    assert "| hf | 1 |" in table and "| hf | 4 |" in table and f"{rows[1]['speedup']:.2f}×" in table
    json.dumps(report)  # the CLI writes it as JSON


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"prompts": 0}, "prompts"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_sizes": []}, "batch_sizes"),
        ({"batch_sizes": [1, 0]}, "batch_sizes"),
        ({"batch_sizes": [32, 32]}, "batch_sizes"),
        ({"backend": "tgi"}, "backend"),
        ({"rounds": 0}, "rounds"),
        ({"warmup": -1}, "warmup"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_specs_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        GenerationBenchSpec(**bad)


def test_spec_from_dict_types_and_batch1_always_first():
    with pytest.raises(ConfigError, match="'batch_sizes\\[1\\]' must be an integer"):
        from_dict(GenerationBenchSpec, {"batch_sizes": [1, "32"]})
    with pytest.raises(ConfigError, match="unknown key 'prompt'"):
        from_dict(GenerationBenchSpec, {"prompt": 3})
    assert GenerationBenchSpec(batch_sizes=[16, 64]).batch_sizes == [1, 16, 64]
    assert GenerationBenchSpec().batch_sizes == [1, 32]


def test_prompts_are_the_demo_evaluation_prompts():
    from ftguard.config import load_config
    from ftguard.data.plan import build_data_plan
    from ftguard.data.template import format_prompt

    spec = GenerationBenchSpec()
    prompts = load_prompts(spec, tokenizer=None)
    plan = build_data_plan(load_config("demo"), roles=())
    assert len(prompts) == 64
    assert prompts == [format_prompt(ex) for ex in plan.eval_harmful]
    with pytest.raises(ConfigError, match="'prompts' = 100000"):
        load_prompts(GenerationBenchSpec(prompts=100000), tokenizer=None)


def test_cli_writes_json_and_names_bad_options(tmp_path, capsys):
    out = tmp_path / "gen.json"
    args = ["bench", "--generation", "--model", "tiny", "--prompts", "3", "--max-new-tokens", "2"]
    assert cli.main([*args, "--batch-sizes", "2", "--backend", "hf", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["settings"]] == ["hf-1", "hf-2"]
    assert report["spec"]["model"] == "tiny" and report["n_prompts"] == 3
    assert "| hf | 2 |" in capsys.readouterr().out
    assert cli.main([*args, "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes must be integers" in capsys.readouterr().err
    assert cli.main([*args, "--prompts", "0"]) == 2
    assert "'prompts'" in capsys.readouterr().err


# --- vLLM backend -----------------------------------------------------------------------------------------


class _FakeLLM:
    """Stands in for vllm.LLM: records its arguments and answers in input order."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []

    def get_tokenizer(self):
        return word_tokenizer()

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        return [
            types.SimpleNamespace(
                outputs=[
                    types.SimpleNamespace(text=f"  answer {len(p['prompt_token_ids'])} ", token_ids=[5] * i)
                ]
            )
            for i, p in enumerate(prompts, start=1)
        ]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_backend_contract_with_a_stand_in(fake_vllm):
    llm = vllm_backend.load("some/model", dtype="float32")
    assert llm.kwargs == {"model": "some/model", "dtype": "float32", "trust_remote_code": False}
    counts: list[int] = []
    texts = vllm_backend.generate(llm, ["the cat sat", "dog"], max_new_tokens=7, token_counts=counts)
    assert texts == ["answer 3", "answer 1"] and counts == [1, 2]
    prompts, params = llm.calls[0]
    assert prompts == [{"prompt_token_ids": [4, 6, 8]}, {"prompt_token_ids": [7]}]
    assert params.temperature == 0 and params.max_tokens == 7
    assert vllm_backend.generate(llm, [], max_new_tokens=7, token_counts=counts) == [] and counts == []
    with pytest.raises(FtguardError):
        vllm_backend.generate(llm, ["dog"], max_new_tokens=0)


def test_vllm_unavailable_without_cuda(fake_vllm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not vllm_backend.available()
    with pytest.raises(FtguardError, match="backend 'vllm' needs a CUDA GPU"):
        run_generation_bench(GenerationBenchSpec(model="tiny", backend="vllm"))


@pytest.mark.gpu
@pytest.mark.skipif(not vllm_backend.available(), reason="needs a CUDA GPU and the vllm package")
def test_vllm_backend_matches_hf_on_gpu():
    from ftguard.models import load_model, load_tokenizer, resolve_model

    model_dir = resolve_model("tiny")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="float32", device="cuda")
    prompts = load_prompts(GenerationBenchSpec(prompts=8), tokenizer)
    llm = vllm_backend.load(model_dir, dtype="float32", gpu_memory_utilization=0.3)
    counts: list[int] = []
    texts = vllm_backend.generate(llm, prompts, max_new_tokens=MAX_NEW, token_counts=counts)
    one_by_one = [vllm_backend.generate(llm, [p], max_new_tokens=MAX_NEW)[0] for p in prompts]
    assert texts == one_by_one  # input order kept
    assert all(1 <= c <= MAX_NEW for c in counts) and all(t == t.strip() for t in texts)
    hf = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=8, progress=False)
    # Different kernels (and fp32 vs vLLM's accumulation order) may flip a near-tie; most must agree.
    assert sum(a == b for a, b in zip(texts, hf, strict=True)) >= len(prompts) // 2
