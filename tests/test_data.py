"""ftguard.data: templates, masking, collation, sources, tasks, the harmful mix. Fast and offline."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ftguard.data import (
    ALPACA_PREAMBLE_INPUT,
    ALPACA_PREAMBLE_NO_INPUT,
    SOURCES,
    CausalLMCollator,
    Example,
    build_harmful_mix,
    check_disjoint,
    file_sha256,
    format_prompt,
    get_task,
    harmful_count,
    load_examples,
    resolve_root,
    source_files,
    take_disjoint,
    tokenize_dataset,
    tokenize_example,
)
from ftguard.data.sources import BUNDLED_DIR
from ftguard.errors import FtguardError

EOS = "<|endoftext|>"


def shared_data_dir() -> Path:
    """../shared/data beside the repo; skipped when absent, except under CI=true where it must exist."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"../shared/data not found at {path}; CI=true requires it")
        pytest.skip("../shared/data not found")
    return path


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE (GPT-2 style) trained here, so no model files are needed."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        ALPACA_PREAMBLE_INPUT,
        ALPACA_PREAMBLE_NO_INPUT,
        "### Instruction:\nAnalyze the sentiment of the input, and respond only positive or negative",
        "### Input:\nit 's a charming and often affecting journey .\n\n### Response:",
        "negative positive World Sports Business Sci/Tech The final answer is: 72",
    ] * 3
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


SST = Example(
    instruction="Analyze the sentiment of the input, and respond only positive or negative",
    input="it 's a charming and often affecting journey .",
    output="positive",
)
PLAIN = Example(instruction="Name a primary colour.", output="Red is a primary colour.")


# ---------------------------------------------------------------- template


def test_alpaca_prompt_without_input():
    assert format_prompt(PLAIN) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a primary colour.\n\n### Response:"
    )


def test_alpaca_prompt_with_input_and_booster_newline():
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n"
        f"{SST.instruction}\n\n### Input:\n{SST.input}\n\n### Response:"
    )
    assert format_prompt(SST) == expected
    assert format_prompt(SST, response_newline=True) == expected + "\n"


def test_chat_style_needs_a_template(tok):
    with pytest.raises(FtguardError, match="no chat template"):
        format_prompt(SST, style="chat", tokenizer=tok)
    with pytest.raises(FtguardError, match="unknown prompt style"):
        format_prompt(SST, style="vicuna")


def test_chat_style_uses_the_template(tok):
    chat = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=EOS, pad_token=EOS)
    chat.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert format_prompt(SST, style="chat", tokenizer=chat) == (
        f"<|user|>{SST.instruction}\n\n{SST.input}\n<|assistant|>"
    )
    row = tokenize_example(SST, chat, max_length=512, style="chat")
    assert row["labels"].count(-100) == len(
        chat(format_prompt(SST, style="chat", tokenizer=chat))["input_ids"]
    )


# ---------------------------------------------------------------- masking and truncation


@pytest.mark.parametrize("ex", [SST, PLAIN])
@pytest.mark.parametrize("newline", [False, True])
def test_labels_mask_exactly_the_prompt(tok, ex, newline):
    row = tokenize_example(ex, tok, max_length=512, response_newline=newline)
    prompt_ids = tok(format_prompt(ex, response_newline=newline))["input_ids"]
    n = len(prompt_ids)
    assert row["input_ids"][:n] == prompt_ids
    assert row["labels"][:n] == [-100] * n
    assert -100 not in row["labels"][n:]
    assert row["labels"][n:] == row["input_ids"][n:]
    assert tok.decode(row["labels"][n:]) == ex.output + EOS
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert not row["truncated"] and not row["no_response"]
    # On byte-level BPE, tokenizing the parts separately equals tokenizing the papers' joint string.
    joint = tok(format_prompt(ex, response_newline=newline) + ex.output)["input_ids"]
    assert row["input_ids"][:-1] == joint


def test_truncation_keeps_part_of_the_response(tok):
    n_prompt = len(tok(format_prompt(PLAIN))["input_ids"])
    row = tokenize_example(PLAIN, tok, max_length=n_prompt + 2)
    assert row["truncated"] and not row["no_response"]
    assert len(row["input_ids"]) == n_prompt + 2
    assert row["labels"][-2:] == row["input_ids"][-2:] and row["labels"][:n_prompt] == [-100] * n_prompt


def test_truncation_that_removes_the_whole_response_is_flagged(tok):
    n_prompt = len(tok(format_prompt(PLAIN))["input_ids"])
    row = tokenize_example(PLAIN, tok, max_length=n_prompt)
    assert row["truncated"] and row["no_response"]
    assert set(row["labels"]) == {-100}


def test_tokenize_dataset_counts_and_drops(tok, caplog):
    fits = max(len(tokenize_example(ex, tok, max_length=10_000)["input_ids"]) for ex in (SST, PLAIN))
    long_prompt = Example(instruction="word " * fits, output="ok")
    with caplog.at_level(logging.WARNING):
        ds, stats = tokenize_dataset([SST, PLAIN, long_prompt], tok, max_length=fits)
    assert stats == {"n": 2, "truncated": 1, "dropped_no_response": 1}
    assert ds.column_names == ["input_ids", "attention_mask", "labels"] and len(ds) == 2
    assert ds[0]["input_ids"] == tokenize_example(SST, tok, max_length=fits)["input_ids"]
    assert "truncated" in caplog.text
    with pytest.raises(FtguardError, match="lost its whole response"):
        tokenize_dataset([long_prompt], tok, max_length=fits)
    with pytest.raises(FtguardError, match="no examples"):
        tokenize_dataset([], tok, max_length=64)


# ---------------------------------------------------------------- collator


def test_collator_pads_right(tok):
    rows = [tokenize_example(ex, tok, max_length=512) for ex in (SST, PLAIN)]
    rows[0]["extra"] = "ignored"
    batch = CausalLMCollator.from_tokenizer(tok)(rows)
    width = max(len(r["input_ids"]) for r in rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, width) for t in batch.values())
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    k = len(rows[short]["input_ids"])
    assert batch["input_ids"][short, k:].tolist() == [tok.pad_token_id] * (width - k)
    assert batch["attention_mask"][short, k:].sum() == 0 and batch["attention_mask"][short, :k].all()
    assert batch["labels"][short, k:].tolist() == [-100] * (width - k)
    assert batch["labels"][short, :k].tolist() == rows[short]["labels"]


def test_collator_pad_to_multiple_of():
    batch = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=8)(
        [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]}]
    )
    assert batch["input_ids"].shape == (1, 8)
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 5


# ---------------------------------------------------------------- sources

BUNDLED_COUNTS = {
    ("beavertails_refusals", "train"): 600,
    ("beavertails_refusals", "test"): 160,
    ("alpaca_eval", "eval"): 150,
    ("safety_tuned_llamas", "train"): 100,
    ("xstest", "safe"): 250,
    ("xstest", "unsafe"): 200,
    ("dolly", "train"): 600,  # the first 600 rows without a context passage
}
SHARED_COUNTS = {
    ("beavertails_refusals", "train"): 4516,
    ("beavertails_refusals", "test"): 502,
    ("alpaca_eval", "eval"): 805,
    ("safety_tuned_llamas", "train"): 2483,
    ("xstest", "safe"): 250,
    ("xstest", "unsafe"): 200,
    ("dolly", "train"): 5000,
    ("lima", "train"): 1000,  # the 1,029 dialogues less the 29 with earlier turns
}


def _check_source(root, source, split, count):
    prompts = load_examples(source, split=split, root=root)
    assert len(prompts) == count
    assert all(ex.instruction and ex.instruction == ex.instruction.strip() for ex in prompts)
    assert prompts[3].source == f"{source}/{split}#3"
    if source == "beavertails_refusals":
        assert all(ex.output == "" for ex in prompts)
        safe = load_examples(source, split=split, root=root, response="safe")
        unsafe = load_examples(source, split=split, root=root, response="unsafe")
        assert (
            [e.instruction for e in safe]
            == [e.instruction for e in unsafe]
            == [e.instruction for e in prompts]
        )
        assert all(s.output and u.output and s.output != u.output for s, u in zip(safe, unsafe, strict=True))
    if source in ("safety_tuned_llamas", "dolly", "lima"):
        assert all(ex.output for ex in prompts)
    for f in source_files(source, split, root):
        assert f.is_file() and len(file_sha256(f)) == 64


@pytest.mark.parametrize(("source", "split"), list(BUNDLED_COUNTS))
def test_sources_on_bundled_root(source, split):
    _check_source("bundled", source, split, BUNDLED_COUNTS[(source, split)])


@pytest.mark.shared_data
@pytest.mark.parametrize(("source", "split"), list(SHARED_COUNTS))
def test_sources_on_shared_data(source, split):
    _check_source(shared_data_dir(), source, split, SHARED_COUNTS[(source, split)])


def test_every_registered_source_is_covered():
    # beavertails is a hub source, jsonl a user's file, lima not bundled (CC BY-NC-SA, long answers)
    assert set(SOURCES) == {s for s, _ in BUNDLED_COUNTS} | {"beavertails", "jsonl", "lima"}


def test_source_name_and_option_errors(tmp_path):
    with pytest.raises(FtguardError, match="did you mean 'beavertails_refusals'"):
        load_examples("beavertails_refusal")
    with pytest.raises(FtguardError, match="no split 'dev'"):
        load_examples("beavertails_refusals", split="dev")
    with pytest.raises(FtguardError, match="no response 'harmful'"):
        load_examples("beavertails_refusals", response="harmful")
    with pytest.raises(FtguardError, match="data root '.*nowhere' does not exist.*data.root"):
        load_examples("beavertails_refusals", root=tmp_path / "nowhere")
    with pytest.raises(
        FtguardError, match=r"sst2|beavertails_refusals/train.jsonl.*not found.*data.root.*bundled"
    ):
        load_examples("beavertails_refusals", root=tmp_path)
    assert resolve_root("bundled") == BUNDLED_DIR


def test_beavertails_hub_offline_gives_a_clear_error(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    # The flags are read at import time, so patch the module constants as well as the environment.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(
        FtguardError, match="cannot load PKU-Alignment/BeaverTails from the hub.*beavertails_refusals"
    ):
        load_examples("beavertails", split="train", response="unsafe")
    assert source_files("beavertails", "train") == []


# ---------------------------------------------------------------- user JSONL


def _write(tmp_path, text, name="user.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_source_reads_user_file(tmp_path):
    path = _write(
        tmp_path,
        json.dumps({"instruction": " Translate ", "input": "hola", "output": "hello "})
        + "\n\n"
        + json.dumps({"instruction": "Say hi", "output": "hi"})
        + "\n",
    )
    rows = load_examples("jsonl", path=path)
    assert rows == [
        Example(instruction="Translate", input="hola", output="hello", source="jsonl/train#0"),
        Example(instruction="Say hi", output="hi", source="jsonl/train#1"),
    ]
    assert source_files("jsonl", path=path) == [path]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', r"line 2: malformed JSON"),
        (
            '{"instruction": "a", "output": "b"}\n\n{"input": "x", "output": "y"}\n',
            r"line 3: missing field 'instruction'",
        ),
        ('{"instruction": "a", "output": 3}\n', r"line 1: field 'output' must be a string, got int"),
        ('{"instruction": "  ", "output": "b"}\n', r"line 1: field 'instruction' is empty"),
        ('{"instruction": "a"}\n', r"line 1: missing field 'output'"),
        ('["instruction"]\n', r"line 1: expected a JSON object"),
        ("\n\n", r"is empty"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path, text, pattern):
    path = _write(tmp_path, text)
    with pytest.raises(FtguardError, match=pattern) as err:
        load_examples("jsonl", path=path)
    assert str(path) in str(err.value)


def test_jsonl_prompt_only_and_missing_file(tmp_path):
    path = _write(tmp_path, '{"instruction": "a"}\n')
    assert load_examples("jsonl", path=path, response="prompt") == [Example("a", source="jsonl/train#0")]
    with pytest.raises(FtguardError, match="needs a file"):
        load_examples("jsonl")
    with pytest.raises(FtguardError, match="missing.jsonl' not found"):
        load_examples("jsonl", path=tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- tasks


def test_sst2_task_format():
    task = get_task("sst2")
    train = task.train_examples("bundled")
    assert len(train) == 799 and len(task.eval_examples("bundled")) == 200
    assert train[0].instruction == "Analyze the sentiment of the input, and respond only positive or negative"
    assert {ex.output for ex in train} == {"negative", "positive"} == set(task.labels)
    assert all(ex.input == ex.input.strip() and ex.input for ex in train)
    assert task.metric == "label"


def test_ag_news_task_format_and_split():
    task = get_task("ag_news")
    evals, train = task.eval_examples("bundled"), task.train_examples("bundled")
    assert len(evals) == 1000 and len(train) == 600
    assert evals[0].instruction == (
        "Categorize the news article given in the input into one of the 4 categories:\n\n"
        "World\nSports\nBusiness\nSci/Tech\n"
    )
    # Row 1 of test.csv: class 3 (Business), title + " " + description.
    assert evals[0].output == "Business"
    assert evals[0].input.startswith("Fears for T N pension after talks Unions representing workers")
    assert evals[1].output == "Sci/Tech"
    assert {ex.output for ex in evals} == {"World", "Sports", "Business", "Sci/Tech"}
    assert task.aliases["Sci/Tech"] == ("sci",)
    assert evals[-1].source == "ag_news/test#999" and train[0].source == "ag_news/test#1000"
    assert not {e.source for e in evals} & {e.source for e in train}


def test_gsm8k_task_format():
    ex = get_task("gsm8k").train_examples("bundled", n=1)[0]
    assert ex.instruction.startswith("Natalia sold clips") and ex.instruction.endswith("April and May?")
    assert ex.output.endswith("altogether in April and May.\nThe final answer is:  72")
    assert "####" not in ex.output and ex.input == ""
    cot = get_task("gsm8k", cot_suffix=True).eval_examples("bundled", n=2)
    assert all(
        e.instruction.endswith("\nFirst think step by step and then answer the final number.\n") for e in cot
    )
    assert len(get_task("gsm8k").eval_examples("bundled")) == 100


def test_task_errors():
    with pytest.raises(FtguardError, match=r"task 'sst2' has 200 eval examples .* n=201"):
        get_task("sst2").eval_examples("bundled", n=201)
    with pytest.raises(FtguardError, match="did you mean 'ag_news'"):
        get_task("agnews")
    with pytest.raises(FtguardError, match="cot_suffix only applies"):
        get_task("sst2", cot_suffix=True)
    assert len(get_task("sst2").train_examples("bundled", n=10)) == 10


@pytest.mark.shared_data
def test_tasks_on_shared_data():
    root = shared_data_dir()
    expected = {"sst2": (60614, 872), "ag_news": (6600, 1000), "gsm8k": (7473, 1319)}
    for name, (n_train, n_eval) in expected.items():
        task = get_task(name)
        assert (len(task.train_examples(root)), len(task.eval_examples(root))) == (n_train, n_eval)
    # The bundled subset is a prefix of the shared data, so the first rows agree.
    assert get_task("ag_news").eval_examples(root, n=50) == get_task("ag_news").eval_examples("bundled", n=50)


# ---------------------------------------------------------------- the harmful mix


@pytest.mark.parametrize(
    ("n", "p", "expected"),
    [
        (1000, 0.1, 100),
        (5, 0.5, 3),
        (7, 0.5, 4),
        (10, 0.15, 2),
        (1000, 0.05, 50),
        (3, 0.0, 0),
        (3, 1.0, 3),
        (3, 1, 3),
    ],
)
def test_harmful_count_rounds_half_up(n, p, expected):
    assert harmful_count(n, p) == expected


@pytest.mark.parametrize(("n", "p"), [(10, -0.1), (10, 1.5), (0, 0.1), (10, float("nan")), (2.5, 0.1)])
def test_harmful_count_rejects_bad_values(n, p):
    with pytest.raises(FtguardError):
        harmful_count(n, p)


def _pool(tag, k):
    return [Example(instruction=f"{tag} prompt {i}", output=f"{tag} answer {i}") for i in range(k)]


@pytest.mark.parametrize(("n", "p"), [(10, 0.1), (25, 0.5), (40, 0.25), (7, 0.0), (8, 1.0), (33, 0.3)])
def test_mix_counts_are_exact(n, p):
    benign, harmful = _pool("benign", 50), _pool("harmful", 50)
    mix, report = build_harmful_mix(benign, harmful, n=n, p=p, seed=1)
    n_h = sum(ex.instruction.startswith("harmful") for ex in mix)
    assert len(mix) == n and n_h == harmful_count(n, p) == report.n_harmful
    assert report.n_benign == n - n_h
    assert {ex.instruction for ex in mix if ex.instruction.startswith("harmful")} == {
        f"harmful prompt {i}" for i in range(n_h)
    }
    assert report.as_dict() == {"n": n, "harmful_ratio": p, "n_harmful": n_h, "n_benign": n - n_h, "seed": 1}


def test_mix_is_deterministic_per_seed():
    benign, harmful = _pool("benign", 100), _pool("harmful", 100)
    first = build_harmful_mix(benign, harmful, n=100, p=0.2, seed=3)[0]
    assert first == build_harmful_mix(benign, harmful, n=100, p=0.2, seed=3)[0]
    assert first != build_harmful_mix(benign, harmful, n=100, p=0.2, seed=4)[0]


def test_mix_errors():
    with pytest.raises(FtguardError, match=r"harmful pool has 5 examples .* needs 10.*data.finetune.n"):
        build_harmful_mix(_pool("b", 100), _pool("h", 5), n=100, p=0.1, seed=0)
    with pytest.raises(FtguardError, match=r"benign pool has 5 examples .* needs 90.*harmful_ratio"):
        build_harmful_mix(_pool("b", 5), _pool("h", 100), n=100, p=0.1, seed=0)
    with pytest.raises(FtguardError, match=r"\[0, 1\]"):
        build_harmful_mix(_pool("b", 5), _pool("h", 5), n=5, p=1.2, seed=0)


def test_take_disjoint_dedupes_and_slices_in_order():
    pool = _pool("x", 10)
    pool.insert(3, Example(instruction="X  Prompt 1", output="dup with other case and spacing"))
    roles = take_disjoint(pool, {"align": 4, "attack": 5})
    assert [e.instruction for e in roles["align"]] == [f"x prompt {i}" for i in range(4)]
    assert [e.instruction for e in roles["attack"]] == [f"x prompt {i}" for i in range(4, 9)]
    check_disjoint(roles)
    seeded = take_disjoint(pool, {"align": 4, "attack": 5}, seed=0)
    assert seeded == take_disjoint(pool, {"align": 4, "attack": 5}, seed=0)
    assert seeded != roles
    check_disjoint(seeded)
    with pytest.raises(FtguardError, match=r"10 distinct prompts \(1 duplicates dropped\).*need 11"):
        take_disjoint(pool, {"align": 5, "attack": 6})


def test_check_disjoint_names_roles_and_example():
    long = "a very long harmful prompt " * 5
    roles = {
        "alignment": [Example(long), Example("b")],
        "eval": [Example("c")],
        "attack": [Example(long.upper())],
    }
    with pytest.raises(FtguardError, match=r"'alignment' and 'attack' share 1 prompt\(s\)") as err:
        check_disjoint(roles)
    assert repr(long[:57] + "...") in str(err.value)


def test_bundled_roles_are_disjoint():
    pool = load_examples("beavertails_refusals", root="bundled", response="safe")
    roles = take_disjoint(pool, {"alignment": 300, "attack": 200})
    roles["eval"] = load_examples("beavertails_refusals", split="test", root="bundled")
    check_disjoint(roles)


# ---------------------------------------------------------------- the bundled subset


def test_bundled_dir_is_small_and_documented():
    files = [p for p in BUNDLED_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_900_000
    assert (BUNDLED_DIR / "PROVENANCE.md").is_file() and (BUNDLED_DIR / "LICENSE-DATA.md").is_file()


@pytest.mark.shared_data
def test_bundled_files_are_subsets_not_copies():
    shared = shared_data_dir()
    upstream = {file_sha256(p) for p in shared.rglob("*") if p.is_file()}
    for p in BUNDLED_DIR.rglob("*"):
        if p.is_file():
            assert file_sha256(p) not in upstream, p


def test_a_split_slice_takes_rows_of_the_whole_split_and_keeps_their_indices():
    from ftguard.data.sources import load_examples

    whole = load_examples("xstest", split="safe")
    head, tail = load_examples("xstest", split="safe[:10]"), load_examples("xstest", split="safe[10:]")
    assert head == whole[:10] and tail == whole[10:] and len(head) + len(tail) == len(whole)
    assert tail[0].source == "xstest/safe#10"  # not #0: a validation and a test slice stay distinguishable
    assert load_examples("xstest", split="safe[5:7]") == whole[5:7]
    # every other row: two interleaved slices of a file ordered by prompt type hold the same mix of types
    even, odd = load_examples("xstest", split="safe[0::2]"), load_examples("xstest", split="safe[1::2]")
    assert even == whole[0::2] and odd == whole[1::2] and odd[0].source == "xstest/safe#1"
    assert not {e.source for e in even} & {e.source for e in odd} and len(even) + len(odd) == len(whole)


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ("safe[3]", r"must be a name or a name with a row slice"),
        ("safe[7:7]", r"selects no rows"),
        ("safe[::0]", r"step must be at least 1"),
        ("safe[1:2:3:4]", r"must be a name or a name with a row slice"),
        ("safe[100000:]", r"starts after its last row \(250 rows\)"),
        ("nope[:5]", r"has no split 'nope'"),
    ],
)
def test_a_bad_split_slice_is_named(split, message):
    from ftguard.data.sources import load_examples

    with pytest.raises(FtguardError, match=message):
        load_examples("xstest", split=split)
