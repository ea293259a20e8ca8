"""Antidote (docs/methods.md, Antidote): the zeroed set against an independently computed Wanda score,
padding, ratio 0, the LoRA-factor target, config validation and an end-to-end post stage."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import LlamaForCausalLM

from ftguard.data.example import Example
from ftguard.methods.antidote import (
    Antidote,
    AntidoteConfig,
    calibration_batches,
    find_linears,
    input_sq_sums,
    lora_factors,
    per_row_count,
    wanda_prune,
)
from ftguard.schema import ConfigError
from tiny import tiny_llama

QKV = ["q_proj", "k_proj", "v_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(seed: int = 0, vocab: int = 64) -> LlamaForCausalLM:
    return tiny_llama(seed=seed, vocab_size=vocab, max_position_embeddings=256).eval()


def _samples(n: int = 5, seed: int = 1) -> list[dict[str, list[int]]]:
    """Rows of different lengths (so batches are padded), labels on the last half."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 64, (4 + 3 * i,), generator=g).tolist()
        half = len(ids) // 2
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * half + ids[half:]}
        )
    return rows


def _layer_inputs(model, ids: list[int]) -> list[torch.Tensor]:
    """Input of each layer's q/k/v projections, [T, d], from the hidden states through input_layernorm (no hook on
    the projections: an independent route to what the hooks see)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
        layers = model.get_decoder().layers
        return [layer.input_layernorm(out.hidden_states[i])[0] for i, layer in enumerate(layers)]


def _expected_zeroed(weight: torch.Tensor, sq: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask: per row, the ceil(ratio·cols) largest |W|·sqrt(Σx²), by a full sort."""
    score = weight.abs() * sq.sqrt()
    k = per_row_count(weight.shape[1], ratio)
    order = score.argsort(dim=1, descending=True)[:, :k]
    return torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order, True)


def _qkv_reference(model, rows, positions=lambda row: slice(None)) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    for row in rows:
        for i, x in enumerate(_layer_inputs(model, row["input_ids"])):
            sq = x[positions(row)].pow(2).sum(0)
            for proj in QKV:
                name = f"model.layers.{i}.self_attn.{proj}"
                sums[name] = sums.get(name, 0) + sq
    return sums


def test_zeroes_per_row_top_fraction_by_independent_wanda_score():
    model, rows = _llama(), _samples()
    before = copy.deepcopy(model.state_dict())
    modules = find_linears(model, QKV)
    assert len(modules) == 6
    sums = input_sq_sums(
        model, modules, calibration_batches(Dataset.from_list(rows), 2, 0, torch.device("cpu"))
    )
    ref = _qkv_reference(model, rows)
    for name in modules:
        torch.testing.assert_close(sums[name], ref[name], rtol=1e-5, atol=1e-5)
    counts = wanda_prune(modules, sums, 0.25)

    after = model.state_dict()
    for name in modules:
        w0 = before[f"{name}.weight"]
        expected = _expected_zeroed(w0, ref[name], 0.25)
        assert torch.equal(after[f"{name}.weight"] == 0, expected), name  # exactly the top set is zero ...
        assert torch.equal(after[f"{name}.weight"][~expected], w0[~expected])  # ... and nothing else moved
        assert int(expected.sum(1).unique()) == 4 and counts[name] == w0.shape[0] * 4
    untouched = [k for k in before if not any(k.startswith(n) for n in modules)]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)


def test_padding_tokens_never_count():
    model, rows = _llama(), _samples()
    modules = find_linears(model, QKV)
    cpu = torch.device("cpu")
    one = input_sq_sums(
        model, modules, calibration_batches(Dataset.from_list(rows), 1, 0, cpu)
    )  # no padding at all
    padded = input_sq_sums(model, modules, calibration_batches(Dataset.from_list(rows), 5, 0, cpu))
    other_pad = input_sq_sums(model, modules, calibration_batches(Dataset.from_list(rows), 5, 63, cpu))
    for name in modules:
        torch.testing.assert_close(padded[name], one[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other_pad[name], one[name], rtol=1e-5, atol=1e-5)
    # the check has teeth: without the mask the padded batch would give other sums
    unmasked = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]
    width = max(len(r["input_ids"]) for r in rows)
    unmasked = [
        {
            k: v + [0 if k != "labels" else -100] * (width - len(v)) if k != "attention_mask" else [1] * width
            for k, v in r.items()
        }
        for r in unmasked
    ]
    wrong = input_sq_sums(model, modules, calibration_batches(Dataset.from_list(unmasked), 5, 0, cpu))
    assert not torch.allclose(
        wrong["model.layers.0.self_attn.q_proj"], one["model.layers.0.self_attn.q_proj"]
    )


def test_response_only_counts_the_answer_tokens():
    model, rows = _llama(), _samples()
    modules = find_linears(model, ["q_proj"])
    sums = input_sq_sums(
        model,
        modules,
        calibration_batches(Dataset.from_list(rows), 3, 0, torch.device("cpu")),
        response_only=True,
    )
    ref = _qkv_reference(model, rows, positions=lambda row: torch.tensor(row["labels"]) != -100)
    for name in modules:
        torch.testing.assert_close(sums[name], ref[name], rtol=1e-5, atol=1e-5)


def test_lora_factors_are_pruned_by_their_own_inputs():
    model = _llama()
    peft = get_peft_model(
        model, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # PEFT starts lora_B at zero: give it values to rank
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    rows = _samples()
    modules = lora_factors(peft)
    assert len(modules) == 8
    before = {n: m.weight.detach().clone() for n, m in modules.items()}
    inputs = [
        _layer_inputs(peft, r["input_ids"]) for r in rows
    ]  # of the unpruned model, as the method sees it
    sums = input_sq_sums(
        peft, modules, calibration_batches(Dataset.from_list(rows), 2, 0, torch.device("cpu"))
    )
    wanda_prune(modules, sums, 0.5)
    # lora_A sees the layer-norm output x; lora_B sees x·Aᵀ (dropout 0), computed here by hand.
    for i in range(2):
        xs = [per_row[i] for per_row in inputs]
        for proj in ("q_proj", "v_proj"):
            stem = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            a_name, b_name = f"{stem}.lora_A.default", f"{stem}.lora_B.default"
            sq_a = sum(x.pow(2).sum(0) for x in xs)
            sq_b = sum((x @ before[a_name].T).pow(2).sum(0) for x in xs)
            for name, sq in ((a_name, sq_a), (b_name, sq_b)):
                expected = _expected_zeroed(before[name], sq, 0.5)
                assert torch.equal(modules[name].weight == 0, expected), name


def test_ratio_zero_changes_nothing():
    model, rows = _llama(), _samples()
    before = copy.deepcopy(model.state_dict())
    modules = find_linears(model, QKV)
    sums = input_sq_sums(
        model, modules, calibration_batches(Dataset.from_list(rows), 2, 0, torch.device("cpu"))
    )
    assert sum(wanda_prune(modules, sums, 0.0).values()) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_per_row_count_has_no_float_surprises():
    assert [
        per_row_count(c, r) for c, r in [(30, 0.1), (10, 0.9), (8, 0.1), (16, 0.25), (16, 0.0), (7, 1.0)]
    ] == [3, 9, 1, 4, 0, 7]


def _ctx(model, tokenizer, examples, **finetuned):
    run = SimpleNamespace(model=SimpleNamespace(max_length=160, template="alpaca", response_newline=False))
    ref = SimpleNamespace(model_dir="unused", adapter_dir=None, base_dir=None, **finetuned)
    return SimpleNamespace(
        run=run,
        plan=SimpleNamespace(alignment_harmful=examples),
        tokenizer=tokenizer,
        finetuned=ref,
        load=lambda r: model,
    )


def test_repair_on_merged_weights_reports_counts_and_fraction():
    from ftguard.data.template import tokenize_dataset
    from ftguard.models import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    model = _llama(vocab=len(tokenizer))
    before = copy.deepcopy(model.state_dict())
    examples = [
        Example(instruction=f"how do I do bad thing {i}?", output=f"here is how {i} " * (i + 1))
        for i in range(6)
    ]
    method = Antidote(AntidoteConfig(dense_ratio=0.25, n_samples=4, batch_size=3))
    repaired, report = method.repair(_ctx(model, tokenizer, examples))

    rows = list(
        tokenize_dataset(examples[:4], tokenizer, max_length=160)[0]
    )  # only the first n_samples calibrate
    ref = _qkv_reference(_load_state(before), rows)
    zeroed = 0
    for name in ref:
        expected = _expected_zeroed(before[f"{name}.weight"], ref[name], 0.25)
        assert torch.equal(repaired.state_dict()[f"{name}.weight"] == 0, expected), name
        zeroed += int(expected.sum())
    assert report["target"] == "weights" and report["calibration_samples"] == 4
    assert report["zeroed_total"] == zeroed == sum(report["zeroed"].values())
    assert report["zeroed_fraction"] == pytest.approx(0.25) and set(report["zeroed"]) == set(ref)


def _load_state(state) -> LlamaForCausalLM:
    model = _llama(vocab=state["model.embed_tokens.weight"].shape[0])
    model.load_state_dict(state)
    return model


def test_config_is_validated():
    from ftguard.schema import from_dict

    with pytest.raises(ConfigError, match="dense_ratio"):
        from_dict(AntidoteConfig, {"dense_ratio": 1.5})
    with pytest.raises(ConfigError, match="n_samples"):
        from_dict(AntidoteConfig, {"n_samples": 0})
    with pytest.raises(ConfigError, match="target"):
        from_dict(AntidoteConfig, {"target": "lora"})
    with pytest.raises(ConfigError, match="dense_ration"):
        from_dict(AntidoteConfig, {"dense_ration": 0.1})
    assert (AntidoteConfig().dense_ratio, AntidoteConfig().n_samples) == (0.1, 2000)


def test_the_continued_alignment_lora_of_the_single_topology_is_refused_before_any_work():
    from ftguard.resolve import load_run

    single = ["post.method=antidote", "adapter.topology=single"]
    with pytest.raises(ConfigError, match="continues the alignment LoRA.*adapter.topology: double"):
        load_run("quickstart-tiny", single)
    # the merged weights are not the alignment LoRA's factors; without an alignment the LoRA is the user's alone
    assert load_run("quickstart-tiny", [*single, "post.args.target=weights"]).methods["post"]
    assert load_run("quickstart-tiny", [*single, "align=null", "evaluate.points=[finetune, post]"]).methods[
        "post"
    ]
    assert load_run("quickstart-tiny", ["post.method=antidote"]).methods["post"]  # double: the original's


@pytest.mark.slow
def test_post_stage_runs_antidote_end_to_end(tmp_path):
    from safetensors.torch import load_file

    from ftguard import cli

    args = [
        "run",
        "quickstart-tiny",
        "--output-dir",
        str(tmp_path),
        "--set",
        "post.method=antidote",
        "--set",
        "post.validation_n=4",
        "--set",
        "post.args.n_samples=16",
        "--set",
        "data.finetune.harmful_ratio=0.5",
        "--set",
        "evaluate.harmful_prompts.n=4",
        "--set",
        "evaluate.task_n=4",
        "--set",
        "evaluate.over_refusal_prompts.n=4",
    ]
    assert cli.main(args) == 0
    manifest = json.loads((tmp_path / "post" / "COMPLETE.json").read_text())
    report = manifest["report"]
    assert manifest["method"] == "antidote" and report["target"] == "adapter"  # a LoRA fine-tune: its factors
    assert (
        report["calibration_samples"] == 16 and report["zeroed_total"] == sum(report["zeroed"].values()) > 0
    )
    assert all(".lora_A." in k or ".lora_B." in k for k in report["zeroed"])
    tuned = load_file(next((tmp_path / "finetune" / "model").glob("*.safetensors")))
    repaired = load_file(next((tmp_path / "post" / "model").glob("*.safetensors")))
    changed = {k for k in tuned if not torch.equal(tuned[k], repaired[k])}
    # zeroing LoRA factors changes exactly the merged projections the fine-tune LoRA targets
    assert changed and all(k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for k in changed)
