"""scripts/testbed_compute.py: run time spent per sweep from the archive, and what is left by defense means."""

from __future__ import annotations

import json

import yaml

from script_module import load_script

compute = load_script("testbed_compute")


def _archive(root, name, defenses, seeds, walls):
    folder = root / name
    folder.mkdir(parents=True)
    spec = {"name": name, "base": "quickstart-tiny", "seeds": seeds, "defenses": defenses}
    (folder / "sweep.yaml").write_text(yaml.safe_dump(spec))
    for run_id, wall in walls.items():
        (folder / "runs" / run_id).mkdir(parents=True)
        results = {"complete": True, "wall_time_s": wall}
        (folder / "runs" / run_id / "results.json").write_text(json.dumps(results))
    return folder


def test_left_is_each_missing_run_at_its_defense_s_mean_else_elsewhere_else_the_sweep_s(tmp_path):
    defenses = {"sft": {}, "kl": {"finetune.method": "kl"}, "lisa": {"finetune.method": "lisa"}}
    _archive(tmp_path, "one", defenses, [1, 2], {"sft/seed1": 3600.0, "kl/seed1": 7200.0})
    _archive(tmp_path, "two", {"lisa": {"finetune.method": "lisa"}}, [1], {"lisa/seed1": 1800.0})
    lines = compute.table(tmp_path, ("one", "two"))
    # one: spent 3 h; left sft/seed2 1 h (its mean here), kl/seed2 2 h, lisa/seed1 and /seed2 0.5 h each (its
    # mean in "two"): 4 h
    assert "| one | 2 of 6 | 3.0 | 0 | 4.0 |" in lines
    assert "| two | 1 of 1 | 0.5 | 0 | 0.0 |" in lines
    assert lines[-1] == "| all | | 3.5 | | 4.0 |"


def test_a_defense_seen_nowhere_costs_this_sweep_s_mean(tmp_path):
    defenses = {"sft": {}, "kl": {"finetune.method": "kl"}}
    _archive(tmp_path, "one", defenses, [1], {"sft/seed1": 3600.0})
    assert "| one | 1 of 2 | 1.0 | 0 | 1.0 |" in compute.table(tmp_path, ("one",))


def test_a_run_another_archive_holds_costs_nothing_and_a_copy_is_not_counted_twice(tmp_path):
    from ftguard.sweep.config import expand, load_sweep

    defenses = {"sft": {}, "kl": {"finetune.method": "kl"}}
    study = _archive(tmp_path, "study", defenses, [1], {"sft/seed1": 3600.0, "kl/seed1": 7200.0})
    # the study's results with their configs
    for run in expand(*load_sweep(str(study / "sweep.yaml")), study):
        path = study / "runs" / run.id / "results.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "config": run.config.to_dict()}))
    # the suite's sft/seed1 is the study's sft/seed1 (same config, another sweep's name); its kl/seed1 was copied
    _archive(tmp_path, "suite", defenses, [1, 2], {"kl/seed1": 7200.0})
    copy = tmp_path / "suite" / "runs" / "kl" / "seed1" / "results.json"
    copy.write_text(json.dumps({**json.loads(copy.read_text()), "reused_from": {"run": "study-kl-seed1"}}))
    lines = compute.table(tmp_path, ("study", "suite"))
    # suite: spent 0 (kl/seed1 is the study's time); to copy: sft/seed1; left sft/seed2 1 h, kl/seed2 2 h
    assert "| suite | 1 of 4 | 0.0 | 1 | 3.0 |" in lines
    assert lines[-1] == "| all | | 3.0 | | 3.0 |"


def test_machine_hours_divide_single_thread_hours_by_the_lanes_that_run_at_once():
    line = compute.machine_hours(23.0, 51.0, ["gemma"], lanes=2)
    assert (
        line
        == "On the machine (2 lanes at once): spent 11.5 h, left 25.5 h + gemma, together 37.0 h + gemma."
    )
