"""The unit graph (ftguard.pipeline.units): one function for the run and the dry run, stable fingerprints, and
method args parsed once per stage."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ftguard import cli
from ftguard.methods import base as method_base
from ftguard.pipeline.run import run_pipeline
from ftguard.pipeline.units import build_graph
from ftguard.resolve import load_run
from ftguard.sweep.config import expand, load_sweep
from ftguard.sweep.plan import dry_run

ROOT = Path(__file__).resolve().parents[1]
ARCHIVED = ROOT / "tests" / "fixtures" / "archived_unit_fingerprints.json"
RESULTS = ROOT / "docs" / "results"
TINY_STEPS = ["align.train.max_steps=1", "finetune.train.max_steps=1"]


def test_archived_sweeps_keep_their_unit_fingerprints():
    # Fingerprints of every unit of the archived CPU sweeps, as the code computed them before the unit graph
    # existed: a stored unit stays valid only while its fingerprint is the same for the same config.
    archived = json.loads(ARCHIVED.read_text())
    assert len(archived) == len(list(RESULTS.glob("cpu-smollm2*/runs/*/*/config.yaml")))
    for run_dir, units in archived.items():
        graph = build_graph(load_run(str(RESULTS / run_dir / "config.yaml")))
        assert {u.key: u.fingerprint for u in graph.units} == units, run_dir


def test_the_graph_lists_every_unit_in_run_order_with_its_upstream():
    resolved = load_run(
        "recovery-tiny", ["data.finetune.harmful_ratio=[0.0, 0.2]", "evaluate.points=[base, align, post]"]
    )
    graph = build_graph(resolved)
    assert [u.key for u in graph.units] == [
        "eval/base",
        "align",
        "eval/align",
        "finetune-p0",
        "post-p0",
        "eval/post-p0",
        "finetune-p0.2",
        "post-p0.2",
        "eval/post-p0.2",
    ]
    by_key = {u.key: u for u in graph.units}
    assert by_key["align"].upstream == graph.fingerprints.base()
    assert by_key["finetune-p0.2"].upstream == by_key["align"].fingerprint
    assert by_key["post-p0.2"].upstream == by_key["finetune-p0.2"].fingerprint
    assert by_key["eval/post-p0.2"].upstream == by_key["post-p0.2"].fingerprint
    assert (by_key["post-p0.2"].method, by_key["post-p0.2"].harmful_ratio) == ("recovery", 0.2)


def _sweep_file(tmp_path: Path, grid: dict, defenses: dict | None = None) -> Path:
    spec = {
        "name": "units",
        "base": "quickstart-tiny",
        "seeds": [3],
        "set": {
            "align.train.max_steps": 1,
            "finetune.train.max_steps": 1,
            "evaluate.points": ["finetune"],
            "evaluate.harmful_prompts.n": 2,
            "evaluate.over_refusal_prompts": None,
            "evaluate.task_n": 2,
            "evaluate.max_new_tokens": 2,
            "evaluate.task_max_new_tokens": 2,
            "evaluate.judge": "keyword",
        },
        "defenses": defenses or {"sft": {}},
        "grid": grid,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "grid, defenses, expected",
    [
        # The fine-tuning LoRA is not part of the aligned model: one alignment for both ranks (the old dry run
        # counted two).
        ({"adapter.finetune.r": [2, 4]}, None, {"align": 1, "finetune": 2, "eval": 2}),
        # A method arg of the alignment changes the aligned model, and so everything after it.
        (
            {"align.args.rho": [0.5, 1.0]},
            {"vaccine": {"align.method": "vaccine"}},
            {"align": 2, "finetune": 2, "eval": 2},
        ),
    ],
)
def test_the_dry_run_counts_the_units_the_sweep_makes(tmp_path, capsys, grid, defenses, expected):
    path = _sweep_file(tmp_path, grid, defenses)
    sweep, folder = load_sweep(str(path))
    plan = dry_run(sweep, expand(sweep, folder, tmp_path / "out"))
    assert plan["units"] == {"post": 0, **expected}
    assert cli.main(["sweep", str(path), "--output-dir", str(tmp_path / "out")]) == 0
    made = {
        kind: len([p for p in (tmp_path / "out" / "units" / kind).iterdir() if not p.name.startswith(".")])
        for kind in expected
    }
    assert made == expected


@pytest.mark.slow
def test_a_three_stage_run_parses_each_stage_s_method_args_once(tmp_path, monkeypatch):
    parsed: Counter[str] = Counter()
    real = method_base.from_dict

    def counting(cls, data, prefix=""):
        parsed[prefix] += 1
        return real(cls, data, prefix=prefix)

    monkeypatch.setattr(method_base, "from_dict", counting)
    resolved = load_run(
        "recovery-tiny",
        [
            *TINY_STEPS,
            "align.method=vaccine",
            "finetune.method=lisa",
            "finetune.args={align_steps: 1, finetune_steps: 1}",
            "post.args={n_harmful: 2, n_task: 2, steps: 1, warmup_steps: 1}",
            "evaluate.points=[post]",
            "evaluate.harmful_prompts.n=2",
            "evaluate.task_n=2",
            "evaluate.over_refusal_prompts=null",
            "evaluate.max_new_tokens=2",
            "evaluate.task_max_new_tokens=2",
            "evaluate.judge=keyword",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    results = run_pipeline(resolved)
    assert results["complete"]
    assert parsed == {"align.args": 1, "finetune.args": 1, "post.args": 1}


def test_refitted_judge_heads_re_evaluate_but_leave_training_units_alone(tmp_path):
    from ftguard.evaluation.judges.ftguard_judge import default_heads_path

    other = tmp_path / "refit.safetensors"
    other.write_bytes(
        default_heads_path().read_bytes() + b" "
    )  # other bytes: another fit, as far as a hash knows

    def units(*overrides: str) -> dict[str, str]:
        resolved = load_run("quickstart-tiny", ["evaluate.judge=ftguard-judge", *overrides])
        return {u.key: u.fingerprint for u in build_graph(resolved).units}

    shipped, refit = units(), units(f"evaluate.judge_options={{heads_path: {other}}}")
    evals = {k for k in shipped if k.startswith("eval/")}
    assert evals and all(shipped[k] != refit[k] for k in evals)
    assert all(shipped[k] == refit[k] for k in shipped if k not in evals)
    # (A judge without shipped weights adds nothing: test_archived_sweeps_keep_their_unit_fingerprints.)
