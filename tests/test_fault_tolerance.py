"""Fault tolerance (issue 8): a training killed with SIGKILL and restarted ends with the very weights of an
uninterrupted run; a killed sweep resumes without redoing finished runs; a write error leaves nothing marked
complete and is reported in one line.

The killed commands run in real subprocesses (`python -m ftguard.cli`) with one torch thread, and are stopped
(SIGSTOP) while the test looks at their output, so that the kill lands after a complete checkpoint (or run) and
before the end however loaded the machine is. The uninterrupted references run in this process, also on one
thread: on one CPU thread the same kernels on the same inputs give the same bits, so resumed weights are
compared bit for bit, and any difference means some state (data order, RNG, optimizer, a method's own state) was
not restored. Each command is finished by running it again; the last time in this process (`cli.main`), since a
fresh interpreter costs ~15 s of imports on the shared cores (the SFT → Lisa test also resumes one stage in a
fresh subprocess).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
import torch
from safetensors.torch import load_file

from ftguard import cli
from ftguard.training.trainer import STATE_FILE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

T = TypeVar("T")
# One thread: bit-identical kernels across processes, and no oversubscription of the shared cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
POLL_S = 0.05
# A run that neither checkpoints nor ends by then is stuck: fail with its log instead of hanging the suite.
DEADLINE_S = 600
# Everything else a step logs is compared: loss, gradient norm and the methods' own metrics.
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"}


def _train(stage: str, max_steps: int, save_steps: int) -> list[str]:
    keys = {"max_steps": max_steps, "save_steps": save_steps, "logging_steps": 1}
    return [a for k, v in keys.items() for a in ("--set", f"{stage}.train.{k}={v}")]


def _start(argv: list[str], log: Path, launcher: tuple[str, ...] = ("-m", "ftguard.cli")) -> subprocess.Popen:
    # Output to a file: a pipe nobody reads would block the child once full.
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, *launcher, *argv],
            env=ENV,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def _torchrun_cli() -> tuple[str, ...]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "ftguard.cli",
    )


def _signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to ``proc`` and every process it started (the launcher first, so it starts no more)."""
    tree = [proc.pid]
    with contextlib.suppress(psutil.NoSuchProcess):
        tree += [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_stopped(proc: subprocess.Popen) -> int:
    """The launcher's status once it has stopped or ended. Polled with WNOHANG: a blocking waitpid would hang
    for good if the stop were never reported."""
    for _ in range(int(60 / POLL_S)):
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid:
            return status
        time.sleep(POLL_S / 10)
    pytest.fail(f"{proc.args} did not stop within 60 s of SIGSTOP")


def _finish(proc: subprocess.Popen, log: Path, timeout: float = DEADLINE_S) -> int:
    """The exit code of ``proc``; on timeout the whole process tree is killed and the test fails with the log."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_tree(proc, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{proc.args} did not end within {timeout} s:\n{log.read_text()[-4000:]}")


def _kill_when(
    proc: subprocess.Popen, ready: Callable[[], T | None], log: Path, near: Callable[[], bool] = lambda: True
) -> T:
    """SIGKILL ``proc`` as soon as ``ready()`` returns something, looking only while the process is stopped: it
    cannot move on between the look and the kill. Returns what ``ready`` returned. Until ``near()`` holds the
    process runs without being stopped: start-up (a launcher's rendezvous, model loading) is left alone."""
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not near() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S / 5)
        if proc.returncode is not None:
            pytest.fail(f"{proc.args} ended before it could be killed:\n{log.read_text()[-4000:]}")
        while True:
            if time.monotonic() > deadline:
                pytest.fail(f"{proc.args} made no checkpoint in {DEADLINE_S} s:\n{log.read_text()[-4000:]}")
            # The launcher and all its workers: under torchrun the workers write the checkpoints, and they run in
            # sessions of their own, so a process-group signal would miss them.
            _signal_tree(proc, signal.SIGSTOP)
            status = _wait_stopped(proc)
            if not os.WIFSTOPPED(status):
                pytest.fail(f"{proc.args} ended before it could be killed:\n{log.read_text()[-4000:]}")
            found = ready()
            if found:
                _signal_tree(proc, signal.SIGKILL)
                assert proc.wait() == -signal.SIGKILL
                return found
            _signal_tree(proc, signal.SIGCONT)
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            _signal_tree(proc, signal.SIGKILL)
            proc.wait()


def _kill_after_first_checkpoint(proc: subprocess.Popen, unit: Path, log: Path) -> int:
    """Kill once ``unit`` has a checkpoint whose ftguard state (written last) is in place; returns its step."""

    def newest() -> int | None:
        if (unit / "COMPLETE.json").exists():
            pytest.fail(f"{unit} was complete before a checkpoint was seen")
        done = [p for p in (unit / "checkpoints").glob("checkpoint-*") if (p / STATE_FILE).is_file()]
        return max((int(p.name.rsplit("-", 1)[1]) for p in done), default=None)

    return _kill_when(proc, newest, log, near=lambda: any((unit / "checkpoints").glob("checkpoint-*")))


def _weights(unit: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {sub: load_file(next((unit / sub).glob("*.safetensors"))) for sub in ("adapter", "model")}


def _step_logs(unit: Path) -> list[dict]:
    return [
        {k: v for k, v in e.items() if k not in TIMING}
        for e in json.loads((unit / "train_log.json").read_text())
        if "loss" in e
    ]


def _assert_same_training(resumed: Path, reference: Path, killed_at: int, max_steps: int) -> None:
    manifest = json.loads((resumed / "COMPLETE.json").read_text())
    assert manifest["resumed_from"] == f"checkpoint-{killed_at}" and manifest["steps"] == max_steps
    assert not (resumed / "checkpoints").exists()
    got, want = _weights(resumed), _weights(reference)
    for sub in want:
        assert got[sub].keys() == want[sub].keys()
        for name, tensor in want[sub].items():
            assert torch.equal(got[sub][name], tensor), f"{resumed.name}/{sub}: {name} differs"
    # Step by step, so that a wrong data order or method state shows where it went wrong. Booster's harmful loss
    # tells which harmful batch was drawn, Lisa's state which batches (user or alignment) were trained on.
    ref_logs = _step_logs(reference)
    assert len(ref_logs) == max_steps
    for step, (got_entry, want_entry) in enumerate(zip(_step_logs(resumed), ref_logs, strict=True)):
        assert got_entry == want_entry, f"{resumed.name}: step {step}"


def test_sft_align_then_lisa_finetune_killed_and_resumed_match_an_uninterrupted_run(tmp_path):
    # lisa-tiny: SFT alignment, then Lisa, 2 alignment / 3 fine-tune steps in turn (proximal term from step 3).
    # First kill: in the SFT stage. The restart, a fresh process, finishes it and is killed in the Lisa stage
    # after checkpoint-5 (or -10), where the alignment state starts again: the resume itself switches the
    # state, taking the other state's anchor from the restored weights.
    argv = [
        "run",
        "lisa-tiny",
        "--set",
        "evaluate.points=[]",
        *_train("align", 12, 3),
        *_train("finetune", 12, 5),
    ]
    ref, out, log = tmp_path / "ref", tmp_path / "cut", tmp_path / "log.txt"
    assert cli.main([*argv, "--output-dir", str(ref)]) == 0

    argv += ["--output-dir", str(out)]
    align_at = _kill_after_first_checkpoint(_start(argv, log), out / "align", log)
    assert align_at < 12 and not (out / "finetune").exists()  # the Trainer also saves at the last step
    finetune_at = _kill_after_first_checkpoint(_start(argv, log), out / "finetune", log)
    assert (out / "align" / "COMPLETE.json").exists() and finetune_at in (5, 10)
    state = json.loads(
        (out / "finetune" / "checkpoints" / f"checkpoint-{finetune_at}" / STATE_FILE).read_text()
    )
    assert state["method"] == {"schedule": ["alignment", 2, 3], "last_step": ["finetune", 2]}

    assert cli.main(argv) == 0
    assert json.loads((out / "results.json").read_text())["complete"] is True
    _assert_same_training(out / "align", ref / "align", align_at, 12)
    _assert_same_training(out / "finetune", ref / "finetune", finetune_at, 12)
    lisa_states = [e["lisa_alignment_state"] for e in _step_logs(out / "finetune")]
    assert lisa_states == [1.0, 1.0, 0.0, 0.0, 0.0] * 2 + [1.0, 1.0]


def test_booster_align_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    # 6 harmful batches of 10 per pass over the 64 harmful answers: the stream starts its second pass at step 7.
    argv = ["align", "booster-tiny", *_train("align", 8, 2)]
    ref, out, log = tmp_path / "ref", tmp_path / "cut", tmp_path / "log.txt"
    assert cli.main([*argv, "--output-dir", str(ref)]) == 0

    argv += ["--output-dir", str(out)]
    killed_at = _kill_after_first_checkpoint(_start(argv, log), out / "align", log)
    assert killed_at < 8
    checkpoint = out / "align" / "checkpoints" / f"checkpoint-{killed_at}"
    (stream,) = json.loads((checkpoint / STATE_FILE).read_text())["aux_streams"]
    assert stream == {"name": "harmful", "batch_size": 10, "epoch": 0, "drawn": killed_at}
    # A kill can also land while the next checkpoint is written: the Trainer's files are there, the ftguard
    # state (the harmful stream's position, written last) is not. Resuming from it would restart the stream.
    torn = checkpoint.with_name(f"checkpoint-{killed_at + 2}")
    shutil.copytree(checkpoint, torn, ignore=shutil.ignore_patterns(STATE_FILE))

    assert cli.main(argv) == 0
    _assert_same_training(out / "align", ref / "align", killed_at, 8)


def test_a_two_process_booster_align_killed_and_resumed_matches_an_uninterrupted_two_process_run(tmp_path):
    # torchrun, 2 ranks over gloo, one thread each: the harmful stream is dealt to the ranks and Booster's probe
    # is averaged over them, so a resume must restore every rank's share of the stream and the step's position.
    # Two launches with the same ranks reduce in the same order, so the weights must be equal bit for bit.
    argv = ["align", "booster-tiny", *_train("align", 6, 2)]
    ref, out = tmp_path / "ref", tmp_path / "cut"
    ref_log, log = tmp_path / "ref.txt", tmp_path / "log.txt"
    reference = _start([*argv, "--output-dir", str(ref)], ref_log, _torchrun_cli())
    assert _finish(reference, ref_log) == 0, ref_log.read_text()[-4000:]

    argv += ["--output-dir", str(out)]
    killed_at = _kill_after_first_checkpoint(_start(argv, log, _torchrun_cli()), out / "align", log)
    assert killed_at < 6
    resumed = _start(argv, log, _torchrun_cli())
    assert _finish(resumed, log) == 0, log.read_text()[-4000:]
    _assert_same_training(out / "align", ref / "align", killed_at, 6)


# ------------------------------------------------------------------------------------------- write errors


def _claims_complete(results: Path) -> bool:
    # results.json is first written after an evaluation or at the end: a run failing before has none.
    return results.exists() and json.loads(results.read_text())["complete"] is True


def _full_disk(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fail_os_replace_into(monkeypatch, unit: Path, name: str, parent: str | None = None) -> None:
    """os.replace raises ENOSPC when it would put ``name`` (in folder ``parent``, if given) inside ``unit``."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        dst = Path(dst)
        if dst.name == name and unit in dst.parents and (parent is None or dst.parent.name == parent):
            _full_disk()
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _fail_safetensors_into(monkeypatch, folder: Path) -> None:
    """Saving a model into ``folder`` leaves a half-written safetensors file, then the disk is full. Faked at
    transformers' public ``save_pretrained``, not at the name it imports its safetensors writer under."""
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def save(self, save_directory, *args, **kwargs):
        if Path(save_directory) == folder:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model.safetensors").write_bytes(b"\0" * 64)
            _full_disk()
        return real(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)


def _fail_torch_save_into(monkeypatch, folder: Path) -> None:
    """torch.save into ``folder`` fails as it does on a full disk: a RuntimeError from its zip writer."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, str | os.PathLike) and Path(f).parent == folder:
            Path(f).write_bytes(b"PK\0")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/0: "
                "file write failed"
            )
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize(
    "unit, fault, resumed_from",
    [
        # the ftguard state of the last checkpoint: the previous checkpoint must survive to resume from
        ("align", "checkpoint state", "checkpoint-4"),
        # the merged model, half written in the staging folder
        ("finetune", "merged model", "checkpoint-8"),
        # everything in place but the marker
        ("finetune", "marker", "checkpoint-8"),
        # the optimizer state: torch.save reports a failed write as a RuntimeError, not an OSError
        ("align", "optimizer state", "checkpoint-4"),
    ],
)
def test_a_write_error_fails_in_one_line_and_leaves_nothing_marked_complete(
    tmp_path, monkeypatch, capsys, unit, fault, resumed_from
):
    argv = ["run", "quickstart-tiny", "--set", "evaluate.points=[]", "--output-dir", str(tmp_path)]
    if fault == "checkpoint state":
        _fail_os_replace_into(monkeypatch, tmp_path / unit, STATE_FILE, parent="checkpoint-8")
    elif fault == "merged model":
        _fail_safetensors_into(monkeypatch, tmp_path / unit / ".staging" / "model")
    elif fault == "optimizer state":
        _fail_torch_save_into(monkeypatch, tmp_path / unit / "checkpoints" / "checkpoint-8")
    else:
        _fail_os_replace_into(monkeypatch, tmp_path / unit, "COMPLETE.json")
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    # The Trainer's progress bar (carriage returns, no newline) may share the error's line: cut at the tag.
    (message,) = [
        line.split("ftguard: error: ", 1)[1] for line in err.split("\n") if "ftguard: error: " in line
    ]
    reason = "file write failed" if fault == "optimizer state" else "No space left on device"
    assert reason in message and str(tmp_path / unit) in message, message
    assert "run the same command again" in message
    assert not (tmp_path / unit / "COMPLETE.json").exists()
    assert not _claims_complete(tmp_path / "results.json")
    assert (tmp_path / "align" / "COMPLETE.json").exists() == (unit != "align")

    monkeypatch.undo()
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True
    assert json.loads((tmp_path / unit / "COMPLETE.json").read_text())["resumed_from"] == resumed_from
    assert load_file(next((tmp_path / unit / "model").glob("*.safetensors")))


def test_overwrite_that_fails_early_leaves_no_stale_complete_results(tmp_path, monkeypatch, capsys):
    import ftguard.pipeline.run as run_mod

    argv = ["run", "quickstart-tiny", "--set", "evaluate.points=[]", *_train("align", 2, 2)]
    argv += [*_train("finetune", 2, 2), "--output-dir", str(tmp_path)]
    assert cli.main(argv) == 0 and _claims_complete(tmp_path / "results.json")
    monkeypatch.setattr(run_mod, "train_stage", _full_disk)
    # another config into the same folder: --overwrite replaces the old outputs, and fails on the way
    assert cli.main([*argv, "--set", "seed=7", "--overwrite"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not _claims_complete(tmp_path / "results.json")


# ------------------------------------------------------------------------------------------------ sweeps

SWEEP = {
    "name": "killed",
    "base": "quickstart-tiny",
    "set": {
        "evaluate.points": ["finetune"],
        "align.train.max_steps": 2,
        "finetune.train.max_steps": 2,
        "evaluate.harmful_prompts.n": 4,
        "evaluate.over_refusal_prompts.n": 4,
        "evaluate.task_n": 4,
    },
    "seeds": [5],
    "defenses": {"sft": {}},
    "grid": {"data.finetune.harmful_ratio": [0.0, 0.25, 0.5]},
}


def _kill_after_first_finished_run(proc: subprocess.Popen, index: Path, log: Path) -> dict[str, str]:
    """Kill the sweep once sweep.json (written atomically after each run) records a complete run; returns the
    status of each run at the kill."""

    def statuses() -> dict[str, str] | None:
        runs = json.loads(index.read_text())["runs"] if index.exists() else {}
        found = {k: v["status"] for k, v in runs.items()}
        return found if "complete" in found.values() else None

    return _kill_when(proc, statuses, log, near=index.exists)


def _mtimes(paths) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def test_a_killed_sweep_resumes_without_redoing_finished_runs_and_never_claims_a_failed_one(
    tmp_path, monkeypatch
):
    import yaml

    import ftguard.pipeline.run as run_mod
    from ftguard.pipeline.outputs import StageDir

    path, out, log = tmp_path / "sweep.yaml", tmp_path / "out", tmp_path / "log.txt"
    path.write_text(yaml.safe_dump(SWEEP))
    argv = ["sweep", str(path), "--output-dir", str(out)]
    killed = _kill_after_first_finished_run(_start(argv, log), out / "sweep.json", log)
    finished = {k for k, s in killed.items() if s == "complete"}
    assert 1 <= len(finished) < 3, killed
    # What was complete at the kill must stay as it is: finished runs and every unit marked complete.
    kept = _mtimes(
        [out / "runs" / k / "results.json" for k in finished]
        + list((out / "units").glob("*/*/COMPLETE.json"))
    )
    untrained = 3 - len(list((out / "units" / "finetune").glob("*/COMPLETE.json")))
    unevaluated = 3 - len(list((out / "units" / "eval").glob("*/COMPLETE.json")))
    assert (out / "units" / "align").is_dir() and len(
        list((out / "units" / "align").glob("*/COMPLETE.json"))
    ) == 1

    calls: dict[str, list[str]] = {"train": [], "evaluate": []}
    real_train, real_evaluate = run_mod.train_stage, run_mod.evaluate_point
    disk_full = True

    def train(run, stage, key, *args, **kwargs):
        calls["train"].append(f"{stage}/{run.data.finetune.harmful_ratio}")
        return real_train(run, stage, key, *args, **kwargs)

    def evaluate(run, key, *args, **kwargs):
        calls["evaluate"].append(f"{key}/{run.data.finetune.harmful_ratio}")
        if run.data.finetune.harmful_ratio != 0.5 or not disk_full:
            return real_evaluate(run, key, *args, **kwargs)
        # The disk fills up as the evaluation of the p = 0.5 run is committed.
        with monkeypatch.context() as m:
            m.setattr(StageDir, "commit", _full_disk)
            return real_evaluate(run, key, *args, **kwargs)

    # The rerun finishes what the kill interrupted, and the last run fails on a full disk.
    monkeypatch.setattr(run_mod, "train_stage", train)
    monkeypatch.setattr(run_mod, "evaluate_point", evaluate)
    assert cli.main(argv) == 1
    assert len(calls["train"]) == untrained and all(c.startswith("finetune/") for c in calls["train"])
    assert len(calls["evaluate"]) == unevaluated
    assert _mtimes(kept) == kept
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    (failed,) = [k for k, v in runs.items() if v["status"] != "complete"]
    assert runs[failed]["axes"]["data.finetune.harmful_ratio"] == 0.5
    status = runs[failed]["status"]
    assert status.startswith("failed: ") and "No space left on device" in status
    assert str(out / "units" / "eval") in status  # the unit being made
    assert not _claims_complete(out / "runs" / failed / "results.json")
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False and report["complete_runs"] == 2

    # Without the fault: only the failed run's evaluation is left to do.
    calls["train"].clear()
    calls["evaluate"].clear()
    disk_full = False
    assert cli.main(argv) == 0
    assert calls == {"train": [], "evaluate": ["finetune/0.5"]}
    assert _mtimes(kept) == kept
    assert {v["status"] for v in json.loads((out / "sweep.json").read_text())["runs"].values()} == {
        "complete"
    }
    assert json.loads((out / "report.json").read_text())["complete"] is True
