"""Bad input through the real entry points (issue 8): every case fails before training with one line that names
the file, the line and the fix, or is accepted with a visible warning and count.

User JSONL files are accepted by data.alignment, data.finetune.harmful and evaluate.harmful_prompts (tasks are
registry names whose files live under data.root, so the TSV/CSV cases use a copy of the bundled root).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftguard import cli
from ftguard.config import load_config
from ftguard.data.plan import build_data_plan
from ftguard.data.sources import BUNDLED_DIR, load_examples
from ftguard.resolve import load_run
from ftguard.training.trainer import FtguardTrainer

CONFIG = "quickstart-tiny"  # alignment n 64, harmful 6 of 64, 16 evaluation prompts
N_RECORDS = 70


@dataclass
class Outcome:
    code: int
    err: list[str]
    trained: list[int]
    out: Path

    @property
    def error(self) -> str:
        return self.err[-1] if self.err else ""


@pytest.fixture
def run_cli(tmp_path, capsys, monkeypatch):
    """``ftguard run CONFIG --set ...`` with training replaced by a recorder."""
    trained: list[int] = []
    monkeypatch.setattr(FtguardTrainer, "train", lambda *a, **k: trained.append(1))
    count = iter(range(1000))

    def run(*overrides: str, config: str = CONFIG) -> Outcome:
        out = tmp_path / f"run{next(count)}"
        sets = sum((["--set", o] for o in overrides), [])
        code = cli.main(["run", config, "--output-dir", str(out), *sets])
        err = capsys.readouterr().err.strip().splitlines()
        return Outcome(code, err, trained, out)

    return run


def assert_refused(result: Outcome, *facts: str) -> None:
    """Exit code 2, one `ftguard: error:` line holding every fact, no traceback, nothing trained or marked done."""
    assert result.code == 2, result.err
    assert result.trained == []
    assert result.error.startswith("ftguard: error: "), result.err
    assert sum("error" in line or "Traceback" in line for line in result.err) == 1, result.err
    for fact in facts:
        assert fact in result.error, (fact, result.error)
    assert not list(result.out.rglob("COMPLETE.json"))
    results = result.out / "results.json"
    assert not results.exists() or json.loads(results.read_text())["complete"] is False


def record(i: int, **fields) -> str:
    row = {
        "instruction": f"user prompt {i}: how would one go about doing thing {i}?",
        "output": f"answer {i}",
    }
    row.update(fields)
    return json.dumps(row)


def write_jsonl(path: Path, lines: list[str] | bytes) -> Path:
    path.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def good_lines(start: int = 0, n: int = N_RECORDS) -> list[str]:
    return [record(i) for i in range(start, start + n)]


# Each role that reads a user JSONL file, as the overrides that point it at PATH.
ROLES = {
    "alignment": ["data.alignment.source=jsonl", "data.alignment.response=null", "data.alignment.path={}"],
    "harmful": [
        "data.finetune.harmful.source=jsonl",
        "data.finetune.harmful.response=null",
        "data.finetune.harmful.path={}",
    ],
    "evaluation": ["evaluate.harmful_prompts.source=jsonl", "evaluate.harmful_prompts.path={}"],
}
KEYS = {
    "alignment": "data.alignment",
    "harmful": "data.finetune.harmful",
    "evaluation": "evaluate.harmful_prompts",
}


def role_overrides(role: str, path: Path) -> list[str]:
    return [o.format(path) for o in ROLES[role]]


# (lines: a bad line after good ones, facts the error must state); line numbers are 1-based and count blank lines.
BAD_FILES = {
    "malformed JSON": (
        [record(0), "", record(1), '{"instruction": "x", "output": ', *good_lines(2)],
        ["line 4", "malformed JSON", "fix or remove that line"],
    ),
    "not an object": (
        [record(0), record(1), '["x", "y"]', *good_lines(2)],
        ["line 3", "expected a JSON object"],
    ),
    "wrong type": (
        [record(0), record(1), json.dumps({"instruction": 3, "output": "y"}), *good_lines(2)],
        ["line 3", "field 'instruction' must be a string, got int", "quoted string"],
    ),
    "wrong input type": (
        [record(0), record(1, input=["a"]), *good_lines(2)],
        ["line 2", "field 'input' must be a string, got list"],
    ),
    "missing instruction": (
        [record(0), json.dumps({"output": "y"}), *good_lines(2)],
        ["line 2", "missing field 'instruction'", "add it"],
    ),
    "empty instruction": (
        [record(0), record(1), record(2, instruction="   "), *good_lines(3)],
        ["line 3", "field 'instruction' is empty", "fill it in or remove the record"],
    ),
    "empty file": ([], ["is empty", "one JSON object per line"]),
    "blank lines only": (["", "   ", "\t"], ["is empty", "one JSON object per line"]),
}
# Cases that only training roles reject: evaluation reads prompts, so answers may be missing there.
NEEDS_OUTPUT = {
    "missing output": (
        [record(0), record(1), json.dumps({"instruction": "z"}), *good_lines(2)],
        ["line 3", "missing field 'output'"],
    ),
    "empty output": (
        [record(0), record(1, output=""), *good_lines(2)],
        ["line 2", "field 'output' is empty"],
    ),
}


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_jsonl_fails_naming_role_file_and_line(run_cli, tmp_path, role, case):
    lines, facts = BAD_FILES[case]
    path = write_jsonl(tmp_path / "user data.jsonl", lines)  # a space in the name must survive the message
    result = run_cli(*role_overrides(role, path))
    assert_refused(result, f"{KEYS[role]}: ", str(path), *facts)


@pytest.mark.parametrize("role", ["alignment", "harmful"])
@pytest.mark.parametrize("case", list(NEEDS_OUTPUT))
def test_training_roles_need_an_output(run_cli, tmp_path, role, case):
    lines, facts = NEEDS_OUTPUT[case]
    path = write_jsonl(tmp_path / "user.jsonl", lines)
    assert_refused(run_cli(*role_overrides(role, path)), f"{KEYS[role]}: ", str(path), *facts)


def test_evaluation_prompts_need_no_output(tmp_path):
    lines = [json.dumps({"instruction": f"evaluation prompt {i}?"}) for i in range(20)]
    lines[3] = json.dumps({"instruction": "evaluation prompt 3?", "output": ""})
    path = write_jsonl(tmp_path / "eval.jsonl", lines)
    plan = build_data_plan(load_config(CONFIG, role_overrides("evaluation", path)), roles=())
    assert [ex.instruction for ex in plan.eval_harmful] == [f"evaluation prompt {i}?" for i in range(16)]


@pytest.mark.parametrize("role", list(ROLES))
def test_non_utf8_bytes_name_file_line_and_offset(run_cli, tmp_path, role):
    head = ("\n".join(good_lines(0, 2)) + "\n").encode()
    bad = b'{"instruction": "caf\xe9 \xff\xfe", "output": "x"}\n'
    path = write_jsonl(tmp_path / "latin1.jsonl", head + bad + ("\n".join(good_lines(2)) + "\n").encode())
    offset = len(head) + bad.index(b"\xe9")
    result = run_cli(*role_overrides(role, path))
    assert_refused(result, str(path), "line 3", f"byte offset {offset}", "0xe9", "must be UTF-8")


def test_utf8_with_bom_and_crlf_is_read(tmp_path):
    path = write_jsonl(
        tmp_path / "windows.jsonl", ("\ufeff" + "\r\n".join(good_lines(0, 3)) + "\r\n").encode()
    )
    rows = load_examples("jsonl", path=path)
    assert [ex.instruction for ex in rows] == [json.loads(line)["instruction"] for line in good_lines(0, 3)]


# ---------------------------------------------------------------- task files under data.root


@pytest.fixture
def root_copy(tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(BUNDLED_DIR, root)
    return root


def _replace_line(path: Path, lineno: int, text: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] = text
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(
    ("text", "facts"),
    [
        (b"a fine sentence\tmaybe", ["line 5", "expected 'sentence<TAB>0|1'", "fix or remove that line"]),
        (b"no tab at all", ["line 5", "expected 'sentence<TAB>0|1'"]),
        (b" \t1", ["line 5", "empty sentence"]),
        (b"caf\xe9 au lait\t1", ["line 5", "must be UTF-8"]),
    ],
)
def test_bad_sst2_row_names_file_and_line(run_cli, root_copy, text, facts):
    tsv = root_copy / "sst2" / "train.tsv"
    _replace_line(tsv, 5, text)
    assert_refused(run_cli(f"data.root={root_copy}"), str(tsv), *facts)


def test_bad_ag_news_row_names_file_and_row(run_cli, root_copy):
    csv_file = root_copy / "ag_news" / "test.csv"
    _replace_line(csv_file, 7, b'"9","A title","A description"')
    result = run_cli(f"data.root={root_copy}", "data.finetune.task=ag_news")
    assert_refused(result, str(csv_file), "row 7", "class(1-4),title,description", "fix or remove that row")


# ---------------------------------------------------------------- prompts shared by two roles


def test_prompts_shared_by_alignment_and_attack_files(run_cli, tmp_path):
    align = write_jsonl(tmp_path / "align.jsonl", good_lines(0, N_RECORDS))
    # The attack file repeats alignment prompt 10 (in other case and spacing: prompts are compared normalised).
    shared = json.loads(record(10))["instruction"]
    harmful = write_jsonl(
        tmp_path / "harmful.jsonl",
        [json.dumps({"instruction": "  " + shared.upper(), "output": "harm"}), *good_lines(100, 10)],
    )
    result = run_cli(*role_overrides("alignment", align), *role_overrides("harmful", harmful))
    assert_refused(
        result,
        "'alignment (data.alignment)' and 'attack (data.finetune.harmful)' share 1 prompt(s)",
        repr(shared),
        "remove the shared prompts from one of the two sets",
    )


def test_evaluation_prompt_taken_from_the_attack_slice(run_cli, tmp_path):
    # quickstart-tiny's attack takes the first records of beavertails_refusals/train (one file, two roles).
    attack_prompt = load_examples("beavertails_refusals", split="train", response="unsafe")[2].instruction
    lines = [json.dumps({"instruction": f"held-out prompt {i}?"}) for i in range(20)]
    lines[5] = json.dumps({"instruction": attack_prompt})
    path = write_jsonl(tmp_path / "eval.jsonl", lines)
    result = run_cli(*role_overrides("evaluation", path))
    shown = attack_prompt if len(attack_prompt) <= 60 else attack_prompt[:57] + "..."
    assert_refused(
        result,
        "'attack (data.finetune.harmful)' and 'evaluation (evaluate.harmful_prompts)' share 1 prompt(s)",
        repr(shown),
    )


def test_duplicates_inside_one_file_are_dropped_not_fatal(tmp_path):
    # Within the attack file a repeated prompt is one prompt: the mix still gets 6 distinct harmful samples.
    lines = [record(0), record(0, output="another answer"), *good_lines(1, 10)]
    path = write_jsonl(tmp_path / "harmful.jsonl", lines)
    plan = build_data_plan(load_config(CONFIG, role_overrides("harmful", path)), roles=())
    keys = [ex.prompt_key for ex in plan.attack_pool]
    assert len(keys) == len(set(keys)) == 6


# ---------------------------------------------------------------- prompts longer than model.max_length


@pytest.mark.slow
def test_long_examples_are_truncated_with_one_warning_and_a_count(tmp_path, caplog):
    lines = good_lines(0, 64)
    for i in (3, 20, 40):  # the prompt alone is longer than max_length: nothing left to learn, dropped
        lines[i] = record(i, instruction=f"long prompt {i} " + "word " * 300)
    for i in (7, 50):  # the answer is cut, the row kept
        lines[i] = record(i, output="answer " * 300)
    path = write_jsonl(tmp_path / "align.jsonl", lines)
    out = tmp_path / "run"
    overrides = [
        *role_overrides("alignment", path),
        "model.max_length=128",
        "finetune=null",
        "evaluate.points=[]",
        "align.train.max_steps=1",
    ]
    with caplog.at_level(logging.WARNING):
        code = cli.main(
            ["run", CONFIG, "--output-dir", str(out), *sum((["--set", o] for o in overrides), [])]
        )
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert (
        "5 of 64 examples" in warnings[0] and "max_length=128" in warnings[0] and "3 dropped" in warnings[0]
    )
    assert "raise model.max_length" in warnings[0]
    manifest = json.loads((out / "align" / "COMPLETE.json").read_text())
    assert manifest["data"] == {"n": 61, "truncated": 5, "dropped_no_response": 3}


# ---------------------------------------------------------------- contradictory configs


@pytest.mark.parametrize(
    ("overrides", "facts"),
    [
        # Booster's fine-tuning must keep training its single LoRA (Booster issue #2; docs/methods.md,
        # Adapter topologies).
        (["align.method=booster"], ["'adapter.topology' is double", "Set adapter.topology: single"]),
        (
            ["post.method=safelora", "align=null", "evaluate.points=[base,finetune]"],
            ["safelora needs the align stage", "set align.method"],
        ),
        (
            ["post.method=recovery", "finetune=null", "evaluate.points=[base]"],
            ["it needs the finetune stage"],
        ),
        (["align=null"], ["'evaluate.points' lists 'align'", "remove 'align' from it"]),
        (["finetune=null"], ["'evaluate.points' lists 'finetune'", "remove 'finetune' from it"]),
        (["evaluate.points=[finetuned]"], ["'evaluate.points' entries must be among"]),
        # A harmful ratio > 0 needs harmful answers; a prompt-only source has none.
        (
            ["data.finetune.harmful.response=prompt"],
            ["data.finetune.harmful: 6 of 6 records", "no answer", "set data.finetune.harmful.response"],
        ),
        (
            ["data.alignment.source=xstest", "data.alignment.split=unsafe", "data.alignment.response=null"],
            ["data.alignment: 64 of 64 records of xstest/unsafe have no answer"],
        ),
        (["data.finetune.harmful=null"], ["'data.finetune.harmful' must be a mapping"]),
        (["data.finetune.harmful_ratio=1.5"], ["'data.finetune.harmful_ratio' must be in [0, 1]"]),
        (["data.finetune.gsm8k_cot_suffix=true"], ["cot_suffix only applies to task 'gsm8k'"]),
        (
            ["model.template=chat", "model.response_newline=true"],
            ["'model.response_newline' only applies to template 'alpaca'", "model.template: alpaca"],
        ),
    ],
)
def test_contradictory_config_is_refused_before_training(run_cli, overrides, facts):
    assert_refused(run_cli(*overrides), *facts)


def test_harmful_source_without_answers_is_fine_when_no_harmful_sample_is_needed(tmp_path):
    cfg = load_config(CONFIG, ["data.finetune.harmful.response=prompt", "data.finetune.harmful_ratio=0"])
    plan = build_data_plan(cfg, roles=())
    assert plan.attack_pool == [] and plan.mix_reports[0.0]["n_harmful"] == 0


def test_booster_double_topology_ablation_warns(caplog):
    with caplog.at_level(logging.WARNING):
        load_run(CONFIG, ["align.method=booster", "align.args.allow_double_topology=true"])
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "ablation" in caplog.text and "Booster issue #2" in caplog.text


def test_ewc_double_topology_warns(caplog):
    # Deliberately a warning (methods/ewc.py): the run works, but the penalty holds nothing of a fresh LoRA.
    with caplog.at_level(logging.WARNING):
        load_run(CONFIG, ["finetune.method=ewc"])
    assert len(caplog.records) == 1 and "adapter.topology: single" in caplog.text


def test_post_point_without_post_stage_is_dropped():
    # By design (config.py): sweeps set evaluate.points: [finetune, post] on runs with and without a post stage.
    cfg = load_config(CONFIG, ["evaluate.points=[finetune,post]"])
    assert cfg.evaluate.points == ["finetune"]


@pytest.mark.parametrize("method", ["recovery", "antidote"])
def test_post_repair_without_align_stage_uses_the_alignment_harmful_set(method):
    # With align: null the base model is the aligned one (a chat model's native safety); these repairs still need
    # the harmful answers of the alignment prompts, disjoint from the attack.
    resolved = load_run(
        CONFIG, ["align=null", f"post.method={method}", "evaluate.points=[base,finetune,post]"]
    )
    plan = build_data_plan(resolved.config, resolved.data_roles)
    assert plan.alignment_harmful and all(ex.output for ex in plan.alignment_harmful)
    attack = {ex.prompt_key for ex in plan.attack_pool}
    assert attack and not attack & {ex.prompt_key for ex in plan.alignment_harmful}
