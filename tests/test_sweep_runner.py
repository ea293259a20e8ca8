"""The sweep runner: unit locks, shards, deferral, selection (--defenses, --seeds), --stop-after, reuse,
redoing runs judged by refitted heads, hardware records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftguard import cli
from ftguard.sweep.config import expand
from sweep_helpers import TINY, tiny_sweep


def test_a_unit_locked_by_another_process_is_busy_only_without_waiting(tmp_path):
    import fcntl

    from ftguard.pipeline.outputs import StageDir, UnitBusy

    unit = StageDir(tmp_path / "units" / "align" / "abc", "abc")
    with unit.lock(wait=False):  # free: taken at once
        pass
    # flock conflicts between two open file descriptions even in one process: this stands for another shard
    with open(tmp_path / "units" / "align" / ".abc.lock", "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(UnitBusy, match="abc"):
            with unit.lock(wait=False):
                raise AssertionError("entered a unit another process holds")
        fcntl.flock(other, fcntl.LOCK_UN)
    with unit.lock(wait=False):
        pass


def test_waiting_for_a_unit_waits_on_the_lock_its_maker_holds(tmp_path):
    import threading

    from ftguard.pipeline.outputs import StageDir, wait_for_unit

    unit = StageDir(tmp_path / "units" / "align" / "abc", "abc")
    waited = threading.Event()
    with unit.lock():
        waiter = threading.Thread(target=lambda: (wait_for_unit(unit.path), waited.set()))
        waiter.start()
        assert not waited.wait(0.5)  # still held: the waiter blocks
    waiter.join(5)
    assert waited.is_set()


def _sweep_file(tmp_path: Path, name: str, ratios: list[float]) -> Path:
    path = tmp_path / "sweep.yaml"
    spec = {"name": name, **TINY, "seeds": [5], "grid": {"data.finetune.harmful_ratio": ratios}}
    path.write_text(yaml.safe_dump(spec))
    return path


def _fake_pipeline(monkeypatch, run_all) -> None:
    """The sweep runner's scheduling without training: each run calls run_all(p, wait_for_units)."""
    import ftguard.pipeline.run as run_mod

    class FakePipeline:
        def __init__(self, run, *, overwrite, store, wait_for_units):
            self.p, self.wait = run.config.data.finetune.harmful_ratio, wait_for_units

        def run_all(self):
            return run_all(self.p, self.wait)

    monkeypatch.setattr(run_mod, "Pipeline", FakePipeline)


def test_a_shard_defers_runs_whose_units_are_busy_and_waits_only_when_all_are(tmp_path, monkeypatch):
    import ftguard.sweep.runner as runner
    from ftguard.pipeline.outputs import UnitBusy

    path = _sweep_file(tmp_path, "d", [0.0, 0.25, 0.5])
    calls = []  # (p, wait) of every attempt, in order, and the units waited for
    busy = {0.0: 1, 0.25: 3}  # times each run finds a unit busy

    def run_all(p, wait):
        calls.append((p, wait))
        if busy.get(p, 0) > 0:
            busy[p] -= 1
            raise UnitBusy(f"units/align/p{p}")
        return {"complete": False}

    _fake_pipeline(monkeypatch, run_all)
    monkeypatch.setattr(runner, "wait_for_unit", lambda unit: calls.append(f"waited for {unit}"))
    out = tmp_path / "out"
    cli.main(["sweep", str(path), "--output-dir", str(out), "--shard", "0/1"])
    # p0 and p0.25 find a unit busy, p0.5 goes through; after it, the earlier runs come first again: p0 goes
    # through; p0.25 stays busy until it is the only run left, when the shard waits for its unit, then tries
    # again, never blocking inside a run.
    assert calls == [
        *[(0.0, False), (0.25, False), (0.5, False), (0.0, False), (0.25, False)],
        *["waited for units/align/p0.25", (0.25, False), "waited for units/align/p0.25", (0.25, False)],
    ]
    index = json.loads((out / "sweep.json").read_text())["runs"]
    assert len(index) == 3 and {e["status"] for e in index.values()} == {"incomplete"}


def test_after_waiting_for_a_unit_a_shard_takes_any_run_whose_units_are_free(tmp_path, monkeypatch):
    # Every run waited on one aligned model; once it was made, the first run's next unit was the other
    # shard's: this shard must go on to the next run, not sit on that unit (it once idled a lane 25 minutes).
    import ftguard.sweep.runner as runner
    from ftguard.pipeline.outputs import UnitBusy

    path = _sweep_file(tmp_path, "a", [0.0, 0.1])
    made, calls = set(), []
    waiting = {0.0: ["align", "finetune-p0.0"], 0.1: ["align"]}  # the units each run will find busy, in order

    def run_all(p, wait):
        calls.append(p)
        left = [u for u in waiting[p] if u not in made]
        if left:
            raise UnitBusy(f"units/{left[0]}")
        return {"complete": False}

    _fake_pipeline(monkeypatch, run_all)
    monkeypatch.setattr(
        runner, "wait_for_unit", lambda unit: made.add(unit.split("/")[1]) or calls.append(unit)
    )
    cli.main(["sweep", str(path), "--output-dir", str(tmp_path / "out"), "--shard", "0/1"])
    # both busy on the aligned model; waited for it; p0 finds its fine-tuned model busy, so p0.1 is made
    assert calls == [0.0, 0.1, "units/align", 0.0, 0.1, 0.0, "units/finetune-p0.0", 0.0]


def test_a_deferred_run_is_retried_as_soon_as_another_run_finishes(tmp_path, monkeypatch):
    from ftguard.pipeline.outputs import UnitBusy

    path = _sweep_file(tmp_path, "r", [0.0, 0.1, 0.2, 0.3])
    calls, busy = [], {0.0: 1}

    def run_all(p, wait):
        calls.append(p)
        if busy.get(p, 0) > 0:
            busy[p] -= 1
            raise UnitBusy(f"units/align/p{p}")
        return {"complete": False}

    _fake_pipeline(monkeypatch, run_all)
    cli.main(["sweep", str(path), "--output-dir", str(tmp_path / "out"), "--shard", "0/1"])
    # not pushed behind the whole sweep (with seeds outermost, a seed would wait for every later seed)
    assert calls == [0.0, 0.1, 0.0, 0.2, 0.3]


def test_a_shard_done_with_its_own_runs_helps_with_the_others(tmp_path, monkeypatch):
    path = _sweep_file(tmp_path, "h", [0.0, 0.1, 0.2, 0.3])
    calls = []
    _fake_pipeline(monkeypatch, lambda p, wait: calls.append(p) or {"complete": False})
    cli.main(["sweep", str(path), "--output-dir", str(tmp_path / "out"), "--shard", "1/2"])
    # its own runs (1 and 3) first, then the other shard's, whose units the locks keep it from doing twice
    assert calls == [0.1, 0.3, 0.0, 0.2]


def test_each_run_s_time_is_counted_once_per_attempt(tmp_path, monkeypatch):
    import itertools

    import ftguard.sweep.runner as runner

    clock = itertools.count(0.0, 10.0)  # every reading of the clock is 10 s after the previous one
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock))
    path = _sweep_file(tmp_path, "w", [0.0, 0.1])
    _fake_pipeline(monkeypatch, lambda p, wait: {"complete": False})
    out = tmp_path / "out"
    cli.main(["sweep", str(path), "--output-dir", str(out)])
    cli.main(["sweep", str(path), "--output-dir", str(out)])  # both made again: a second attempt each
    index = json.loads((out / "sweep.json").read_text())["runs"]
    assert [e["wall_time_s"] for e in index.values()] == [20.0, 20.0]


def test_stop_after_starts_no_run_that_would_end_past_the_budget_and_the_same_command_goes_on(
    tmp_path, monkeypatch, capsys
):
    import ftguard.sweep.runner as runner

    now = [0.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: now[0])
    path = _sweep_file(tmp_path, "s", [0.0, 0.1, 0.2, 0.3])
    done, calls = set(), []
    minutes = {0.0: 10, 0.1: 25, 0.2: 10, 0.3: 10}

    def run_all(p, wait):
        calls.append(p)
        now[0] += minutes[p] * 60
        done.add(p)
        return {"complete": True}

    monkeypatch.setattr(runner, "is_done", lambda run: run.config.data.finetune.harmful_ratio in done)
    _fake_pipeline(monkeypatch, run_all)
    out = tmp_path / "out"
    # 1 h: 0 and 0.1 end at 35 min; 0.2 would end at 35 + 25 (the longest so far) = 60 min, not past 1 h; 0.3 at
    # 45 + 25 = 70 min would be: it is left for the next call.
    cli.main(["sweep", str(path), "--output-dir", str(out), "--stop-after", "1"])
    assert calls == [0.0, 0.1, 0.2]
    assert "stopped by --stop-after with 1 run(s) left" in capsys.readouterr().out
    cli.main(["sweep", str(path), "--output-dir", str(out), "--stop-after", "1"])
    assert calls == [0.0, 0.1, 0.2, 0.3]
    assert "stopped by" not in capsys.readouterr().out


def test_defenses_runs_only_the_named_rows_and_says_when_they_are_done(tmp_path, monkeypatch, capsys):
    import ftguard.pipeline.run as run_mod
    import ftguard.sweep.runner as runner

    path = tmp_path / "sweep.yaml"
    spec = {
        "name": "sel",
        **TINY,
        "seeds": [5],
        "defenses": {"sft": {}, "kl": {"finetune.method": "kl"}, "lisa": {"finetune.method": "lisa"}},
    }
    path.write_text(yaml.safe_dump(spec))
    done, calls = set(), []

    class FakePipeline:
        def __init__(self, run, *, overwrite, store, wait_for_units):
            self.method = run.config.finetune.method

        def run_all(self):
            calls.append(self.method)
            done.add(self.method)
            return {"complete": True}

    monkeypatch.setattr(run_mod, "Pipeline", FakePipeline)
    monkeypatch.setattr(runner, "is_done", lambda run: run.config.finetune.method in done)
    out = str(tmp_path / "out")
    # the selection in the sweep's order, whatever the order given; the sweep is not complete, the selection is
    assert cli.main(["sweep", str(path), "--output-dir", out, "--defenses", "lisa,kl"]) == 0
    assert calls == ["kl", "lisa"]
    cli.main(["sweep", str(path), "--output-dir", out])  # the rest (rc 1: the fakes write no results)
    assert calls == ["kl", "lisa", "sft"]
    capsys.readouterr()
    assert cli.main(["sweep", str(path), "--output-dir", out, "--defenses", "kl,ewc"]) == 2
    assert "--defenses: ewc not in sweep sel (its defenses: kl, lisa, sft)" in capsys.readouterr().err


def test_seeds_runs_only_the_named_seeds_alone_or_with_defenses(tmp_path, monkeypatch, capsys):
    import ftguard.pipeline.run as run_mod
    import ftguard.sweep.runner as runner

    path = tmp_path / "sweep.yaml"
    spec = {
        "name": "sel",
        **TINY,
        "seeds": [5, 6, 7],
        "defenses": {"sft": {}, "kl": {"finetune.method": "kl"}},
    }
    path.write_text(yaml.safe_dump(spec))
    done, calls = set(), []

    class FakePipeline:
        def __init__(self, run, *, overwrite, store, wait_for_units):
            self.key = (run.config.finetune.method, run.config.seed)

        def run_all(self):
            calls.append(self.key)
            done.add(self.key)
            return {"complete": True}

    monkeypatch.setattr(run_mod, "Pipeline", FakePipeline)
    monkeypatch.setattr(runner, "is_done", lambda run: (run.config.finetune.method, run.config.seed) in done)
    out = str(tmp_path / "out")
    # one whole seed first: every defense of seed 6, none of the others; the selection is complete, the sweep not
    assert cli.main(["sweep", str(path), "--output-dir", out, "--seeds", "6"]) == 0
    assert sorted(calls) == [("kl", 6), ("sft", 6)]
    # with --defenses both apply, in the sweep's order whatever the order given
    assert cli.main(["sweep", str(path), "--output-dir", out, "--seeds", "7,5", "--defenses", "kl"]) == 0
    assert calls[2:] == [("kl", 5), ("kl", 7)]
    capsys.readouterr()
    assert cli.main(["sweep", str(path), "--output-dir", out, "--seeds", "5,9"]) == 2
    assert "--seeds: 9 not in sweep sel (its seeds: 5, 6, 7)" in capsys.readouterr().err
    # the plan of a selection counts the selection: its header's product is the runs it lists
    assert (
        cli.main(["sweep", str(path), "--output-dir", out, "--dry-run", "--seeds", "5,7", "--defenses", "kl"])
        == 0
    )
    assert "sweep sel: 2 runs = 1 defenses × 2 seeds" in capsys.readouterr().out
    for bad in ("", "five", "4,x"):
        with pytest.raises(SystemExit):
            cli.main(["sweep", str(path), "--output-dir", out, "--seeds", bad])


def test_stop_after_must_be_a_positive_number_of_hours(tmp_path, capsys):
    path = _sweep_file(tmp_path, "n", [0.0])
    for bad in ("0", "-2", "soon"):
        with pytest.raises(SystemExit):
            cli.main(["sweep", str(path), "--stop-after", bad])
        assert "--stop-after takes a positive number of hours" in capsys.readouterr().err


def test_the_progress_bar_counts_runs_done_before_the_start_as_its_initial_value(tmp_path, monkeypatch):
    import tqdm.auto

    import ftguard.sweep.runner as runner

    path = _sweep_file(tmp_path, "b", [0.0, 0.1, 0.2])
    done = {0.0, 0.2}
    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(runner, "is_done", lambda run: run.config.data.finetune.harmful_ratio in done)
    _fake_pipeline(monkeypatch, lambda p, wait: done.add(p) or {"complete": True})
    cli.main(["sweep", str(path), "--output-dir", str(tmp_path / "out")])
    # tqdm's rate is (n - initial) / elapsed: the two runs skipped at once must not make the ETA look short
    (bar,) = bars
    assert (bar.initial, bar.n, bar.total) == (2, 3, 3)
    # the runs found done are in the index too (they used to be dropped once a later run finished)
    index = json.loads((tmp_path / "out" / "sweep.json").read_text())["runs"]
    assert len(index) == 3


def test_shards_sharing_a_directory_keep_each_others_index_entries_and_times_add_up(tmp_path):
    from ftguard.sweep.runner import _update_index

    _update_index(tmp_path, "s", {"a": {"status": "complete", "wall_time_s": 7.0}})
    _update_index(tmp_path, "s", {"b": {"status": "failed: x", "wall_time_s": 1.0}})
    # a shard that found "a" done (no time of its own) keeps the time of the shard that ran it
    _update_index(tmp_path, "s", {"a": {"status": "complete", "wall_time_s": None}})
    # "b" made again after its failure: the index counts both attempts
    _update_index(tmp_path, "s", {"b": {"status": "complete", "wall_time_s": 2.5}})
    index = json.loads((tmp_path / "sweep.json").read_text())
    assert index == {
        "name": "s",
        "runs": {
            "a": {"status": "complete", "wall_time_s": 7.0},
            "b": {"status": "complete", "wall_time_s": 3.5},
        },
    }


def test_a_finished_run_is_redone_when_its_judge_was_refit_since(tmp_path):
    from ftguard.evaluation.judges import judge_versions
    from ftguard.sweep.runner import is_done

    def run_judged_by(judge):
        sweep = tiny_sweep(defenses={"sft": {}}, set={**TINY["set"], "evaluate.judge": judge})
        (run,) = expand(sweep, tmp_path, tmp_path / judge)
        run.config.out_dir.mkdir(parents=True)
        return run

    def finish(run, **recorded):
        results = {"complete": True, "config_hash": run.config.fingerprint(), **recorded}
        (run.config.out_dir / "results.json").write_text(json.dumps(results))

    run = run_judged_by("ftguard-judge")
    today = judge_versions("ftguard-judge", {})
    assert today  # the shipped heads' hash
    finish(run, judge_versions=today)
    assert is_done(run)
    finish(run, judge_versions={"ftguard-judge": "another-fit"})
    assert not is_done(run)
    finish(run)  # written before results recorded the judge's version
    assert not is_done(run)
    # a judge without shipped weights has no version: results written before the field stay done
    keyword = run_judged_by("keyword")
    finish(keyword)
    assert is_done(keyword)


def test_a_unit_s_hardware_names_the_cpu_and_its_widest_bf16_kernels(monkeypatch):
    import ftguard.models.loading as loading

    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_cpuinfo", lambda: "processor\t: 0\nmodel name\t: AMD EPYC 9R14\n")
    monkeypatch.setattr(loading.platform, "machine", lambda: "x86_64")
    for amx, avx512_bf16, expected in [
        (True, True, "AMX"),
        (False, True, "AVX512-BF16"),
        (False, False, None),
    ]:
        monkeypatch.setattr(loading.torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(
            loading.torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False
        )
        kernels = expected or loading.torch.backends.cpu.get_cpu_capability()  # AVX2, AVX512, ...
        assert loading.hardware_label() == f"cpu: AMD EPYC 9R14 (x86_64, {kernels})"
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(loading.torch.cuda, "get_device_name", lambda i: f"NVIDIA H100 #{i}")
    assert loading.hardware_label() == "cuda: NVIDIA H100 #0"


def test_reuse_copies_another_sweeps_finished_run_of_the_same_config_and_makes_only_the_rest(
    tmp_path, monkeypatch, capsys
):
    from ftguard.evaluation.judges import judge_versions
    from ftguard.sweep.config import load_sweep
    from ftguard.sweep.runner import is_done

    # The other sweep (another name, so other run names and folders) finished p = 0.5 and p = 0.75; its p = 0.75
    # was judged by a judge refit since.
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    other_sweep, folder = load_sweep(str(_sweep_file(tmp_path / "a", "study", [0.5, 0.75])))
    other = tmp_path / "study-archive"
    sources = {}
    for run in expand(other_sweep, folder, other):
        sources[run.config.data.finetune.harmful_ratio] = str(run.config.out_dir)
        ev = run.config.evaluate
        versions = judge_versions(ev.judge, ev.judge_options, ev.extra_judges)
        if run.config.data.finetune.harmful_ratio == 0.75:
            versions = {**versions, ev.judge: "a refit since"}
        run.config.out_dir.mkdir(parents=True)
        (run.config.out_dir / "results.json").write_text(
            json.dumps(
                {
                    "complete": True,
                    "name": run.config.name,
                    "config_hash": run.config.fingerprint(),
                    "config": run.config.to_dict(),
                    "judge_versions": versions,
                    "wall_time_s": 600.0,
                    "stages": {"finetune-p0.5": {"harmful_score": 42.0}},
                }
            )
        )

    calls = []
    _fake_pipeline(monkeypatch, lambda p, wait: calls.append(p) or {"complete": False})
    path = _sweep_file(tmp_path / "b", "suite", [0.25, 0.5, 0.75])
    out = tmp_path / "out"
    cli.main(["sweep", str(path), "--output-dir", str(out), "--reuse", str(other)])
    assert calls == [0.25, 0.75]  # 0.5 copied; 0.75's judge differs, 0.25 was never made there

    suite, folder = load_sweep(str(path))
    copied = next(r for r in expand(suite, folder, out) if r.config.data.finetune.harmful_ratio == 0.5)
    results = json.loads((copied.config.out_dir / "results.json").read_text())
    assert results["name"] == copied.config.name != results["reused_from"]["run"]
    assert results["reused_from"]["dir"] == sources[0.5]
    assert results["stages"] == {"finetune-p0.5": {"harmful_score": 42.0}} and results["wall_time_s"] == 600.0
    assert (copied.config.out_dir / "config.yaml").is_file() and is_done(copied)
    entry = json.loads((out / "sweep.json").read_text())["runs"][copied.id]
    assert entry["status"] == "complete" and entry["reused_from"] == results["reused_from"]["dir"]

    # the dry run says which runs --reuse would copy, and counts no unit for them
    cli.main(["sweep", str(path), "--output-dir", str(tmp_path / "dry"), "--reuse", str(other), "--dry-run"])
    assert "1 run(s) copied from --reuse folders" in capsys.readouterr().out

    # a copy is not a source: reusing the suite from another sweep would hide where the numbers were made
    third = tmp_path / "third"
    calls.clear()
    cli.main(["sweep", str(path), "--output-dir", str(third), "--reuse", str(out)])
    assert calls == [0.25, 0.5, 0.75]

    assert cli.main(["sweep", str(path), "--output-dir", str(out), "--reuse", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--reuse" in err and "no runs/ folder there" in err
