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


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a whole module; a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.

    For modules of tiny-model tests: on matrices 16 wide threading only costs, and a lot when the 2 cores are
    shared with other jobs. Subprocesses are not affected: a module that starts some sets their environment.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _registries() -> dict[int, dict[str, type]]:
    import ftguard.attacks.base  # noqa: F401  (each module below makes its registry)
    import ftguard.evaluation.judges  # noqa: F401
    import ftguard.evaluation.winrate  # noqa: F401
    import ftguard.methods.registry  # noqa: F401
    from ftguard.registry import all_registries

    # by identity: a test may make a registry of its own (tests/test_registry.py), of any kind name
    return {id(registry): registry.loaded() for registry in all_registries()}


@pytest.fixture(scope="session")
def _builtin_registries() -> dict[int, dict[str, type]]:
    # A class that a test module registered when it was imported is already here: it is not built in (its module
    # is the test's), so the first check reports it.
    return {
        kind: {name: cls for name, cls in entries.items() if cls.__module__.startswith("ftguard.")}
        for kind, entries in _registries().items()
    }


@pytest.fixture(autouse=True, scope="module")
def _registries_unchanged(request, _builtin_registries):
    """After each module, the registries (methods, attacks, judges, pairwise judges) hold exactly the built-ins.

    A stand-in method or judge would otherwise stay registered for every later module, and tests that go through
    all methods or judges would depend on the order the modules run in. Register one for a test with
    ``monkeypatch.setitem`` on the registry (e.g. ``ftguard.methods.registry._METHODS``, ``ftguard.evaluation.judges.JUDGES``; for a
    module, in a module-scoped fixture under ``pytest.MonkeyPatch.context()``), which removes it afterwards.
    """
    yield
    from ftguard.registry import all_registries

    now = _registries()
    kinds = {id(registry): registry.kind for registry in all_registries()}
    changes = []
    for key, builtin in _builtin_registries.items():
        kind = kinds[key]
        added = sorted(set(now[key]) - set(builtin))
        removed = sorted(set(builtin) - set(now[key]))
        replaced = sorted(n for n in set(builtin) & set(now[key]) if now[key][n] is not builtin[n])
        changes += [
            f"{kind} {what}: {names}"
            for what, names in (("added", added), ("removed", removed), ("replaced", replaced))
            if names
        ]
    if changes:
        # Put the built-in state back, so that only this module fails.
        for registry in all_registries():
            if id(registry) in _builtin_registries:
                registry.clear()
                registry.update(_builtin_registries[id(registry)])
        pytest.fail(
            f"the registries changed during {request.module.__name__} (or when a test module was imported): "
            + "; ".join(changes),
            pytrace=False,
        )


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
