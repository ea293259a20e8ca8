"""Model cards of a run's saved models (ftguard.model_card) and `ftguard run --push-to-hub`."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from ftguard import cli
from ftguard.config import load_config
from ftguard.errors import FtguardError
from ftguard.model_card import build_model_card, final_model_key
from ftguard.models import resolve_model
from ftguard.pipeline.run import run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
SMALL = [
    "align.train.max_steps=2",
    "finetune.train.max_steps=2",
    "evaluate.points=[base,align,finetune]",
    "evaluate.harmful_prompts.n=4",
    "evaluate.over_refusal_prompts.n=4",
    "evaluate.task_n=4",
    "evaluate.batch_size=4",
]
TOKEN = "hf_NotARealTokenButSecret123"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "run"
    run_pipeline(load_config("quickstart-tiny", [*SMALL, f"output_dir={out}"]))
    return out


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("key", ["align", "finetune"])
def test_each_evaluated_model_has_a_card_that_reads_back_the_evaluation(run_dir, key):
    entry = _results(run_dir)["stages"][key]
    card = ModelCard.load(run_dir / key / "model" / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert {"ftguard", "sft"} <= set(data.tags)
    assert data.base_model is None and data.license is None  # tiny is a random model, on no hub
    found = {r.metric_type: r for r in data.eval_results}
    assert {"harmful_score", "harmful_score_plus", "finetune_accuracy", "over_refusal"} <= set(found)
    for name, result in found.items():
        assert result.metric_value == entry[name]
        assert result.metric_args["ci95"] == entry["intervals"][name]
        assert [result.metric_args["k"], result.metric_args["n"]] == entry["counts"][name]
    assert found["harmful_score"].metric_config == "keyword"
    assert found["harmful_score"].metric_args["judge"]["name"] == "keyword"
    assert found["over_refusal"].metric_args["refusal_detector"]["name"] == "rules"
    assert found["over_refusal"].metric_config == "rules"
    assert found["finetune_accuracy"].metric_config == entry["task_rule"]
    # the eval files' hashes, without the machine's absolute paths
    assert found["harmful_score"].dataset_args["sha256"]
    assert "/work" not in str(card) and str(run_dir) not in str(card)
    meta = data.to_dict()["ftguard"]
    assert meta["harmful_ratio"] == entry["harmful_ratio"]
    assert meta["config_hash"] == _results(run_dir)["config_hash"]
    assert list(meta["defense"]) == (["align"] if key == "align" else ["align", "finetune"])
    assert f"{entry['harmful_score']:.1f}" in card.text and "not comparable" in card.text


def test_the_base_models_folder_gets_no_card(run_dir):
    assert "base" in _results(run_dir)["stages"]  # evaluated, but the folder is the model cache's
    assert not (Path(resolve_model("tiny")) / "README.md").exists()


def _synthetic(run_dir, judge):
    results = copy.deepcopy(_results(run_dir))
    results["model"] = "smollm2-135m"
    results["judge"] = {"name": judge}
    return results


def test_card_names_the_hub_base_and_license_and_the_judges_caveat(run_dir):
    card = build_model_card(_synthetic(run_dir, "ftguard-judge"), "finetune")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert "MiniLM" in card.text and "beaver-dam-7b" in card.text and "not comparable" in card.text
    papers = build_model_card(_synthetic(run_dir, "beaver-dam"), "finetune")
    assert "not comparable" not in papers.text


def test_a_run_with_several_ratios_has_no_single_final_model():
    cfg = load_config("quickstart-tiny", ["data.finetune.harmful_ratio=[0.1,0.2]"])
    with pytest.raises(FtguardError, match="final models"):
        final_model_key(cfg)
    assert final_model_key(load_config("quickstart-tiny", [])) == "finetune"


@pytest.fixture
def hub_calls(monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        return "https://huggingface.co/commit/fake"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


@pytest.mark.parametrize("public", [False, True])
def test_push_to_hub_uploads_the_final_model_with_the_env_token(
    run_dir, hub_calls, monkeypatch, capsys, caplog, public
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    argv = ["run", "quickstart-tiny", *(f"--set={o}" for o in SMALL), "--output-dir", str(run_dir)]
    argv += ["--push-to-hub", "someone/tiny-guarded", *(["--hub-public"] if public else [])]
    with caplog.at_level(logging.DEBUG):
        assert cli.main(["-v", *argv]) == 0
    upload = hub_calls["upload_folder"]
    assert upload["folder_path"] == str(run_dir / "finetune" / "model")
    assert upload["repo_id"] == "someone/tiny-guarded" and upload["token"] == TOKEN
    assert (run_dir / "finetune" / "model" / "README.md").exists()
    repo = hub_calls["create_repo"]
    assert repo["repo_id"] == "someone/tiny-guarded" and repo["private"] is (not public)
    assert repo["token"] == TOKEN
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text
    assert "someone/tiny-guarded" in out.out


def test_push_to_hub_without_a_token_fails_in_one_line_before_training(
    tmp_path, hub_calls, monkeypatch, capsys
):
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def no_run(*args, **kwargs):
        raise AssertionError("the run started without a token")

    monkeypatch.setattr("ftguard.pipeline.run.run_pipeline", no_run)
    argv = ["run", "quickstart-tiny", "--output-dir", str(tmp_path), "--push-to-hub", "someone/x"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_TOKEN" in err
    assert not hub_calls


@pytest.mark.parametrize("blocked", [True, False])
def test_run_gates_reports_and_pushes_only_what_the_policy_lets_through(
    run_dir, hub_calls, monkeypatch, tmp_path, capsys, blocked
):
    # HS ≤ 100 always holds; the tiny config measures no instruction refusal, and a must-pass rule on a missing
    # metric fails closed.
    metric = "instruction_refusal" if blocked else "harmful_score"
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"rules:\n  - metric: {metric}\n    tier: must_pass\n    max: 100\n")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    report = tmp_path / "page.html"
    argv = ["run", "quickstart-tiny", *(f"--set={o}" for o in SMALL), "--output-dir", str(run_dir)]
    argv += ["--policy", str(policy), "--report", str(report), "--push-to-hub", "someone/tiny-guarded"]
    assert cli.main(argv) == (1 if blocked else 0)
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert verdict["passed"] is (not blocked)
    assert ("upload_folder" in hub_calls) is (not blocked)
    assert "blocked" in capsys.readouterr().out if blocked else True
    page = report.read_text()
    assert "<html" in page.lower() and ('<p class="fail">' in page) is blocked


def test_a_bad_policy_fails_before_training(tmp_path, capsys):
    bad = tmp_path / "policy.yaml"
    bad.write_text("rules:\n  - metric: HS\n    tier: must_pass\n    maximum: 5\n")
    out = tmp_path / "never"
    assert cli.main(["run", "quickstart-tiny", "--output-dir", str(out), "--policy", str(bad)]) != 0
    assert "maximum" in capsys.readouterr().err and not out.exists()
