"""Output directories that never look complete unless they are.

A stage writes into ``<dir>/.staging``, moves the finished files into place, and writes ``COMPLETE.json``
last (atomically). A directory without that marker is unfinished whatever else it holds; a marker whose
fingerprint differs from the current config means the directory belongs to another config.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftguard.errors import FtguardError

MARKER = "COMPLETE.json"


class UnitBusy(Exception):
    """Another process holds this unit's lock (``StageDir.lock(wait=False)``): a sweep shard defers the run.
    Deliberately not an FtguardError/OSError, so that it never reads as a failed run. ``str()`` is the unit's
    folder (``wait_for_unit`` takes it)."""


def _lock_of(unit_dir: Path) -> Path:
    return unit_dir.parent / f".{unit_dir.name}.lock"


def wait_for_unit(unit_dir: str | Path) -> None:
    """Block until no process holds the lock of the unit at ``unit_dir`` (its maker finished, or died)."""
    with file_lock(_lock_of(Path(unit_dir))):
        pass


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def file_lock(lock_path: Path, *, wait: bool = True) -> Iterator[None]:
    """An exclusive POSIX advisory lock on ``lock_path`` for processes sharing a directory. With
    ``wait=False`` a lock held elsewhere raises BlockingIOError at once. A no-op where fcntl is missing
    (Windows: one process per output directory)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class StageDir:
    """One unit of pipeline output (a trained stage or an evaluation point)."""

    def __init__(self, path: Path, fingerprint: str, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.overwrite = overwrite

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def staging(self) -> Path:
        return self.path / ".staging"

    def is_complete(self) -> bool:
        """True when a finished output for this very config is present."""
        if not self.marker.exists():
            return False
        found = read_json(self.marker).get("fingerprint")
        if found == self.fingerprint:
            return True
        if self.overwrite:
            shutil.rmtree(self.path)
            return False
        raise FtguardError(
            f"{self.path} holds output of a different config (fingerprint {found}, now {self.fingerprint}): "
            "use another output_dir or pass --overwrite"
        )

    @contextlib.contextmanager
    def lock(self, wait: bool = True) -> Iterator[None]:
        """Hold an exclusive lock on this unit: parallel processes sharing a store (``sweep --shard``) wait
        instead of training the same unit twice; the second finds it complete. With ``wait=False`` a unit
        locked elsewhere raises UnitBusy at once (the caller has other work to do first). An OSError that
        names no file is re-raised naming this unit."""
        held = contextlib.ExitStack()
        try:
            held.enter_context(file_lock(_lock_of(self.path), wait=wait))
        except BlockingIOError:
            raise UnitBusy(str(self.path)) from None
        with held:
            try:
                yield
            except OSError as exc:
                if exc.filename is None and exc.errno is not None:
                    # A failed write() names no file ("No space left on device"): name the unit being made.
                    raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
                raise

    def manifest(self) -> dict[str, Any]:
        return read_json(self.marker)

    def begin(self) -> Path:
        """A clean staging directory to write into."""
        if self.overwrite and self.path.exists() and not self.marker.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Move staged files into place, then mark the directory complete."""
        for item in sorted(self.staging.iterdir()):
            target = self.path / item.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(item, target)
        self.staging.rmdir()
        manifest = {"fingerprint": self.fingerprint, **manifest}
        write_json_atomic(self.marker, manifest)
        return manifest
