"""Shared fixtures: offline tiny model, the shared data directory, isolation of hub access."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# Nothing may reach the Hugging Face hub from the test suite. Set at import time: huggingface_hub reads these
# once, when it is first imported (test modules import it during collection).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def shared_data_dir() -> Path:
    """../shared/data beside the repo (or $FTGUARD_SHARED_DATA); skip without it, but fail under CI."""
    path = Path(os.environ.get("FTGUARD_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared data directory {path} is missing")
        pytest.skip(f"{path} not found (a fresh clone has no ../shared); these tests run in CI")
    return path


@pytest.fixture
def shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture(autouse=True)
def _pinned_precision(request, monkeypatch):
    """``@pytest.mark.precision("fp32" | "bf16")`` pins what ``auto`` precision resolves to for one test.

    Tests that compare numbers with tight tolerances pin fp32, so they hold on CPUs with and without native bf16;
    bf16 tests force bf16 autocast, which runs (slower) on every CPU. Unmarked tests follow $FTGUARD_PRECISION,
    the hardware by default: CI runs the suite once with each (see .ci/run). Subprocesses inherit the setting.
    """
    marker = request.node.get_closest_marker("precision")
    if marker is not None:
        from ftguard.models import PRECISION_ENV

        monkeypatch.setenv(PRECISION_ENV, marker.args[0])
