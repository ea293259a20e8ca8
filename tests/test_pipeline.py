"""End to end: `ftguard run quickstart-tiny`, skip-on-rerun, resume after an interruption, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ftguard import cli
from ftguard.config import load_config
from ftguard.errors import FtguardError
from ftguard.models import hardware_label
from ftguard.pipeline.run import run_pipeline
from ftguard.training.trainer import FtguardTrainer

pytestmark = pytest.mark.slow

REQUIRED_STAGE_KEYS = {
    "harmful_score",
    "harmful_score_plus",
    "finetune_accuracy",
    "n_harmful_prompts",
    "n_task",
    "judge",
    "model",
    "method",
    "seed",
    "config_hash",
}


def test_quickstart_tiny_end_to_end_and_rerun_skips(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "quickstart-tiny", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    assert set(results["stages"]) == {"base", "align", "finetune"}
    for key, entry in results["stages"].items():
        assert REQUIRED_STAGE_KEYS <= set(entry), key
        assert 0 <= entry["harmful_score"] <= entry["harmful_score_plus"] <= 100
        # a run of its own keeps its answers inside its folder, named relative to it (the folder can move)
        assert (
            entry["generations"] == f"eval/{key}/generations.jsonl" and (out / entry["generations"]).is_file()
        )
        # every rate comes with its counts and a 95% interval around it; over-refusal on 16 XSTest safe prompts
        assert entry["n_over_refusal_prompts"] == 16 and entry["counts"]["over_refusal"][1] == 16
        for metric in (
            "harmful_score",
            "harmful_score_plus",
            "finetune_accuracy",
            "over_refusal",
            "degenerate_rate",
            "benign_degenerate_rate",
        ):
            k, n = entry["counts"][metric]
            lo, hi = entry["intervals"][metric]
            assert entry[metric] == pytest.approx(100 * k / n) and lo <= entry[metric] <= hi, (key, metric)
    assert (
        results["stages"]["finetune"]["method"] == "sft"
        and results["stages"]["finetune"]["harmful_ratio"] == 0.1
    )
    assert {"torch", "transformers", "peft", "accelerate"} <= set(results["versions"])
    assert (
        results["data"]["mixes"]["0.1"]["n_harmful"] == 6
        and results["data"]["mixes"]["0.1"]["n_benign"] == 58
    )
    assert results["judge"]["name"] == "keyword"
    hashes = results["data"]["sources"]
    assert any(f.endswith("sst2/train.tsv") for f in hashes["task"])
    assert all(len(h) == 64 for role in hashes.values() for h in role.values()) and hashes["alignment"]
    assert (out / "results.md").read_text().count("|") > 10 and "over-refusal" in (
        out / "results.md"
    ).read_text()
    benign = [
        json.loads(line)
        for line in (out / "eval" / "finetune" / "generations.jsonl").read_text().splitlines()
    ]
    assert sum(row["kind"] == "benign" for row in benign) == 16
    # each rate's per-item outcomes are kept without text, in the order of generations.jsonl, for paired effects
    outcomes = results["stages"]["finetune"]["outcomes"]
    flags = [r["flagged"] for r in benign if r["kind"] == "harmful"]
    degenerate = [r["degenerate"] for r in benign if r["kind"] == "harmful"]
    assert outcomes["harmful_score"]["bits"] == "".join("1" if f else "0" for f in flags)
    assert outcomes["harmful_score_plus"]["bits"] == "".join(
        "1" if f or d else "0" for f, d in zip(flags, degenerate, strict=True)
    )
    assert outcomes["over_refusal"]["bits"] == "".join(
        "1" if r["refused"] else "0" for r in benign if r["kind"] == "benign"
    )
    assert (
        outcomes["finetune_accuracy"]["bits"].count("1")
        == results["stages"]["finetune"]["counts"]["finetune_accuracy"][0]
    )
    # the same prompts at every point: the outcomes of align and finetune pair
    assert (
        outcomes["harmful_score"]["items"] == results["stages"]["align"]["outcomes"]["harmful_score"]["items"]
    )
    assert (out / "config.yaml").exists() and results["config"]["model"]["name"] == "tiny"
    # what each trained unit was made in and on, from its manifest: a study resumed on a CPU that resolves
    # `auto` precision differently, or on another kind of CPU, shows it in results.json, not only in the unit
    # folders (which are not archived)
    for key in ("align", "finetune"):
        manifest = json.loads((out / key / "COMPLETE.json").read_text())
        assert manifest["precision"].startswith("float32") and manifest["steps"] > 0
        assert manifest["hardware"] == hardware_label()
        assert results["trained"][key] == {
            "method": manifest["method"],
            "precision": manifest["precision"],
            "hardware": manifest["hardware"],
            "steps": manifest["steps"],
            "runtime_s": manifest["train_runtime_s"],
        }
    # weights as safetensors only; checkpoints cleaned up once complete
    assert list((out / "align" / "model").glob("*.safetensors")) and not list(out.rglob("*.bin"))
    assert not (out / "align" / "checkpoints").exists()
    table = capsys.readouterr().out
    assert "| finetune | sft | 0.1 |" in table

    # the aligned model differs from the base, the fine-tuned from the aligned
    aligned = load_file(next((out / "align" / "model").glob("*.safetensors")))
    tuned = load_file(next((out / "finetune" / "model").glob("*.safetensors")))
    assert any(not torch.equal(aligned[k], tuned[k]) for k in aligned)

    # a re-run finds every unit complete and trains nothing
    calls = []
    orig = FtguardTrainer.train
    FtguardTrainer.train = lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    try:
        assert cli.main(["run", "quickstart-tiny", "--output-dir", str(out)]) == 0
    finally:
        FtguardTrainer.train = orig
    assert calls == []
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["stages"] == results["stages"] and rerun["trained"] == results["trained"]

    # compare writes a table and a plot
    assert cli.main(["compare", str(out), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    overrides = ["evaluate.points=[]", "finetune=null"]
    cfg = load_config("quickstart-tiny", [*overrides, f"output_dir={tmp_path / 'ref'}"])
    run_pipeline(cfg)
    reference = load_file(next((tmp_path / "ref" / "align" / "model").glob("*.safetensors")))

    cfg = load_config("quickstart-tiny", [*overrides, f"output_dir={tmp_path / 'cut'}"])
    steps = {"n": 0}
    orig = FtguardTrainer.training_step

    def crash_after_six(self, *args, **kwargs):
        steps["n"] += 1
        if steps["n"] > 6:  # checkpoint-4 exists (save_steps 4), step 7 never happens
            raise KeyboardInterrupt
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(FtguardTrainer, "training_step", crash_after_six)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    assert not (tmp_path / "cut" / "align" / "COMPLETE.json").exists()
    assert (tmp_path / "cut" / "align" / "checkpoints" / "checkpoint-4").is_dir()

    monkeypatch.setattr(FtguardTrainer, "training_step", orig)
    run_pipeline(cfg)
    manifest = json.loads((tmp_path / "cut" / "align" / "COMPLETE.json").read_text())
    assert manifest["resumed_from"] == "checkpoint-4" and manifest["steps"] == 8
    resumed = load_file(next((tmp_path / "cut" / "align" / "model").glob("*.safetensors")))
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.finetune.n=100000"], "data.finetune.n"),
        (["data.alignment.n=100000"], "data.alignment.n"),
        (["data.root=/nonexistent/dir"], "/nonexistent/dir"),
        (["data.finetune.task=sst3"], "sst2"),
        (["evaluate.judge=beaverdam"], "beaver-dam"),
        (
            [
                "data.alignment.source=jsonl",
                "data.alignment.path=/no/such.jsonl",
                "data.alignment.response=null",
            ],
            "/no/such.jsonl",
        ),
        (
            ["data.alignment.source=jsonl", "data.alignment.path=/no/such.jsonl"],
            "data.alignment: source 'jsonl' has no response 'safe'",
        ),
        (["evaluate.harmful_prompts.n=100000"], "evaluate.harmful_prompts.n"),
        (["model.name=someone/not-a-model"], "offline"),
        (
            [
                "align.method=repnoise",
                "data.alignment.source=safety_tuned_llamas",
                "data.alignment.response=null",
            ],
            "align.method 'repnoise' needs the data role 'alignment_harmful'",
        ),
    ],
)
def test_bad_input_fails_before_training_with_one_line(tmp_path, overrides, message, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(FtguardTrainer, "train", lambda *a, **k: trained.append(1))
    code = cli.main(
        ["run", "quickstart-tiny", "--output-dir", str(tmp_path), *sum((["--set", o] for o in overrides), [])]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and trained == []
    assert err[-1].startswith("ftguard: error: ") and message in err[-1], err


def test_chat_template_runs_end_to_end(tmp_path):
    cfg = load_config(
        "quickstart-tiny",
        [
            "model.template=chat",
            "evaluate.points=[finetune]",
            "align.train.max_steps=2",
            "finetune.train.max_steps=2",
            f"output_dir={tmp_path}",
        ],
    )
    results = run_pipeline(cfg)
    assert results["complete"] and set(results["stages"]) == {"finetune"}
    answers = [json.loads(line) for line in (tmp_path / "eval" / "finetune" / "generations.jsonl").open()]
    assert len(answers) == 16 + 16 + 16 and {a["kind"] for a in answers} == {"harmful", "task", "benign"}


def test_pipeline_refuses_a_different_config_in_the_same_dir(tmp_path):
    cfg = load_config("quickstart-tiny", ["evaluate.points=[]", "finetune=null", f"output_dir={tmp_path}"])
    run_pipeline(cfg)
    changed = load_config(
        "quickstart-tiny", ["evaluate.points=[]", "finetune=null", "seed=1", f"output_dir={tmp_path}"]
    )
    with pytest.raises(FtguardError, match="different config"):
        run_pipeline(changed)
