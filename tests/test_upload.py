"""A customer's upload taken as it is (data.finetune.upload): reading chat and Alpaca JSONL with file:line errors,
loss on every assistant turn of a multi-turn row, and a run from an aligned model on the upload alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftguard.data.template import IGNORE_INDEX, format_prompt, tokenize_dataset, tokenize_example
from ftguard.data.upload import read_upload
from ftguard.errors import FtguardError
from ftguard.models import load_tokenizer
from ftguard.pipeline.run import run_pipeline
from ftguard.pipeline.units import build_graph
from ftguard.resolve import load_run
from ftguard.schema import ConfigError

CHAT = [
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    {
        "messages": [
            {"role": "system", "content": "You answer in French."},
            {"role": "user", "content": "Hello?"},
            {"role": "assistant", "content": "Bonjour."},
            {"role": "user", "content": "Thanks."},
            {"role": "assistant", "content": "De rien."},
        ]
    },
]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return path


def test_chat_rows_are_read_with_their_turns_and_counted(tmp_path):
    rows, report = read_upload(_write(tmp_path / "u.jsonl", CHAT))
    single, multi = rows
    # one exchange is an ordinary instruction row; the conversation keeps every turn
    assert (single.instruction, single.output, single.messages) == ("Say hi.", "Hi!", ())
    assert (multi.instruction, multi.output) == ("Thanks.", "De rien.") and len(multi.messages) == 5
    assert [r.source for r in rows] == ["u.jsonl#1", "u.jsonl#2"]
    assert report["rows"] == 2 and report["chat"] == 2 and report["assistant_turns"] == 3
    assert report["multi_turn"] == 1 and report["with_system"] == 1


def test_alpaca_rows_are_read(tmp_path):
    rows, report = read_upload(
        _write(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 2", "output": "4"}])
    )
    assert (rows[0].instruction, rows[0].input, rows[0].output) == ("Add", "2 and 2", "4")
    assert report["alpaca"] == 1 and report["chat"] == 0


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "ending with an assistant turn; got user"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]\.role must be one of"),
        (
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
            "in alternation",
        ),
        ({"messages": [{"role": "user", "content": " "}]}, r"messages\[0\]\.content must be a non-empty"),
        ({"messages": []}, "needs 'messages'"),
        ({"instruction": "x", "output": ""}, "needs a non-empty 'output'"),
        ({"instruction": 3, "output": "y"}, "'instruction' must be a string"),
        ("not json", "malformed JSON"),
    ],
)
def test_a_bad_row_fails_naming_file_and_line(tmp_path, row, message):
    good = {"instruction": "a", "output": "b"} if "messages" not in str(row) else CHAT[0]
    path = _write(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(FtguardError, match=rf"bad\.jsonl, line 2: .*{message}"):
        read_upload(path)


def test_one_format_per_file_and_the_file_must_exist(tmp_path):
    with pytest.raises(FtguardError, match="mixes chat rows"):
        read_upload(_write(tmp_path / "m.jsonl", [CHAT[0], {"instruction": "a", "output": "b"}]))
    with pytest.raises(FtguardError, match="does not exist"):
        read_upload(tmp_path / "none.jsonl")


def test_every_assistant_turn_and_only_those_carry_the_loss(tmp_path):
    tokenizer = load_tokenizer("tiny")
    (_, multi), _ = read_upload(_write(tmp_path / "u.jsonl", CHAT))
    row = tokenize_example(multi, tokenizer, max_length=512, style="chat")
    # the trained spans, read back: each assistant turn's text and its end-of-turn marker, as the template renders
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(tokenizer.decode(current))
                current = []
        else:
            assert label == token
            current.append(token)
    spans += [tokenizer.decode(current)] if current else []
    assert spans == ["Bonjour.<|endoftext|>\n", "De rien.<|endoftext|>\n"]
    full = tokenizer.apply_chat_template([dict(role=r, content=c) for r, c in multi.messages], tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == full
    # the evaluation prompt is the conversation up to the last assistant turn
    prompt = format_prompt(multi, style="chat", tokenizer=tokenizer)
    assert full.startswith(prompt) and prompt.endswith("<|assistant|>\n") and "De rien" not in prompt
    # the batched path gives the same rows; a multi-turn row under the Alpaca template is refused
    dataset, stats = tokenize_dataset([multi], tokenizer, max_length=512, style="chat")
    assert dataset[0]["labels"] == row["labels"] and stats["n"] == 1
    with pytest.raises(FtguardError, match="model.template: chat"):
        tokenize_example(multi, tokenizer, max_length=512, style="alpaca")


def test_the_upload_config_is_checked_before_any_work(tmp_path):
    path = _write(tmp_path / "u.jsonl", CHAT)
    with pytest.raises(ConfigError, match=r"harmful_ratio.*must be 0 with an upload"):
        load_run("quickstart-tiny", [f"data.finetune.upload={{path: {path}}}"])
    with pytest.raises(ConfigError, match=r"upload.*remove data\.finetune\.attack"):
        load_run(
            "quickstart-tiny",
            [
                f"data.finetune.upload={{path: {path}}}",
                "data.finetune.harmful_ratio=0",
                "data.finetune.attack.name=jailbreak_tuning",
            ],
        )


def test_a_provider_run_from_the_aligned_model_on_the_upload_alone(tmp_path):
    train = [{"instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(12)]
    held_out = [{"instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(20, 26)]
    upload, evaluation = _write(tmp_path / "u.jsonl", train), _write(tmp_path / "e.jsonl", held_out)
    resolved = load_run(
        "quickstart-tiny",
        [
            "align=null",
            f"data.finetune.upload={{path: {upload}, eval_path: {evaluation}}}",
            "data.finetune.harmful_ratio=0",
            "finetune.train.max_steps=2",
            "evaluate.points=[finetune]",
            "evaluate.harmful_prompts.n=4",
            "evaluate.over_refusal_prompts.n=4",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    plan = build_graph(resolved).plan
    assert plan.mixes[0.0] == read_upload(upload)[0] and plan.attack_pool == []
    assert plan.task_eval == read_upload(evaluation)[0]
    results = run_pipeline(resolved)
    point = results["stages"]["finetune"]
    assert point["n_task"] == 6 and point["counts"]["finetune_accuracy"][1] == 6
    assert results["data"]["mixes"]["0"]["rows"] == 12 and results["data"]["mixes"]["0"]["upload"]
    assert set(results["data"]["sources"]["upload"]) == {str(upload), str(evaluation)}
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "eval" / "finetune" / "generations.jsonl").open()
    ]
    assert sorted(r["gold"] for r in rows if r["kind"] == "task") == sorted(r["output"] for r in held_out)


def test_a_chat_upload_runs_to_a_gate_verdict(tmp_path, monkeypatch):
    from ftguard import cli
    from ftguard.methods.filter import ModerationFilter

    # The screen's judge stands in at its boundary: it flags the French answers, so the report has rows to name.
    monkeypatch.setattr(
        ModerationFilter,
        "flags",
        lambda self, examples: ["Bonjour" in e.output or "De rien" in e.output for e in examples],
    )

    upload = _write(tmp_path / "chat.jsonl", CHAT * 4)
    out = tmp_path / "run"
    overrides = [
        "align=null",
        "model.template=chat",
        f"data.finetune.upload={{path: {upload}, eval_path: {upload}}}",
        "data.finetune.harmful_ratio=0",
        "finetune.method=filter",
        "finetune.train.max_steps=2",
        "evaluate.points=[finetune]",
        "evaluate.harmful_prompts.n=4",
        "evaluate.over_refusal_prompts.n=4",
        "evaluate.task_max_new_tokens=8",
    ]
    args = ["run", "quickstart-tiny", "--output-dir", str(out), *sum((["--set", s] for s in overrides), [])]
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["data"]["mixes"]["0"]["multi_turn"] == 4
    assert results["stages"]["finetune"]["counts"]["finetune_accuracy"][1] == 8
    # the customer's rows carry no harmful label: the screen names the rows it dropped instead of counting harm
    screen = json.loads((out / "finetune" / "COMPLETE.json").read_text())["method_data"]["filter"]
    assert "uploaded_harmful" not in screen and screen["uploaded"] == 8
    assert screen["removed_rows"] == ["chat.jsonl#2", "chat.jsonl#4", "chat.jsonl#6", "chat.jsonl#8"]
    assert (screen["removed"], screen["kept"]) == (4, 4)
    assert cli.main(["gate", str(out), "--max-hs", "100", "--min-fa", "0"]) == 0
    fa = results["stages"]["finetune"]["finetune_accuracy"]
    assert cli.main(["gate", str(out), "--min-fa", "100"]) == (0 if fa == 100 else 1)
