"""Outputs never look complete unless they are; a different config is never silently reused."""

from __future__ import annotations

import pytest

from ftguard.errors import FtguardError
from ftguard.pipeline.outputs import StageDir, write_json_atomic


def test_marker_is_written_last_and_staging_disappears(tmp_path):
    unit = StageDir(tmp_path / "align", "abc")
    assert not unit.is_complete()
    staging = unit.begin()
    (staging / "model").mkdir()
    (staging / "model" / "w.safetensors").write_bytes(b"x")
    assert not unit.is_complete(), "staged files alone do not make a complete stage"
    unit.commit({"steps": 3})
    assert unit.is_complete()
    assert (tmp_path / "align" / "model" / "w.safetensors").read_bytes() == b"x"
    assert not unit.staging.exists()
    assert unit.manifest()["steps"] == 3 and unit.manifest()["fingerprint"] == "abc"


def test_crash_before_commit_leaves_an_incomplete_dir_that_is_redone(tmp_path):
    unit = StageDir(tmp_path / "u", "abc")
    (unit.begin() / "half").write_text("partial")
    # (crash here) — a new attempt starts from a clean staging dir
    again = StageDir(tmp_path / "u", "abc")
    assert not again.is_complete()
    assert list(again.begin().iterdir()) == []


def test_other_config_is_refused_unless_overwrite(tmp_path):
    unit = StageDir(tmp_path / "u", "abc")
    unit.begin()
    unit.commit({})
    with pytest.raises(FtguardError, match="different config .* --overwrite"):
        StageDir(tmp_path / "u", "xyz").is_complete()
    fresh = StageDir(tmp_path / "u", "xyz", overwrite=True)
    assert not fresh.is_complete() and not (tmp_path / "u").exists()


def test_atomic_json_leaves_no_temp_files(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_unit_lock_makes_a_second_process_wait_until_the_first_is_done(tmp_path):
    import threading
    import time

    unit = StageDir(tmp_path / "units" / "align" / "abc", "abc")
    events = []

    def second():
        with StageDir(unit.path, "abc").lock():
            events.append(("second", unit.is_complete()))

    with unit.lock():
        worker = threading.Thread(target=second)
        worker.start()
        time.sleep(0.3)
        assert events == []  # still waiting for the lock
        unit.begin()
        unit.commit({"steps": 1})
        events.append(("first", True))
    worker.join(timeout=10)
    # the waiter went second and found the unit complete: it would skip it, not train it again
    assert events == [("first", True), ("second", True)]
