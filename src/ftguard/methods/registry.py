"""Method registry: a method registers itself by name and stage with one decorator.

Used at the edges (config validation, CLI); the core never imports a method by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftguard.errors import FtguardError
from ftguard.registry import Registry

if TYPE_CHECKING:
    from ftguard.methods.base import Method

STAGE_NAMES = ("align", "finetune", "post")


def _load_builtin_methods() -> None:
    from ftguard.methods import load_builtin_methods

    load_builtin_methods()


_METHODS: Registry[type[Method]] = Registry("method", _load_builtin_methods)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` under ``cls.name`` (lower-case, unique) for ``cls.stages``."""
    bad = [s for s in cls.stages if s not in STAGE_NAMES]
    if not cls.stages or bad:
        raise ValueError(f"method {cls.name!r} has invalid stages {cls.stages!r}; use {STAGE_NAMES}")
    return _METHODS.register(cls.name, cls)


def all_methods() -> dict[str, type[Method]]:
    return _METHODS.loaded()


def get_method(name: str, stage: str) -> type[Method]:
    methods = all_methods()
    for_stage = [n for n, m in methods.items() if stage in m.stages]
    if name not in methods:
        raise FtguardError(_METHODS.unknown(name, f" for stage '{stage}'", choices=for_stage))
    if stage not in methods[name].stages:
        raise FtguardError(
            f"method '{name}' runs in stage(s) {', '.join(methods[name].stages)}, not '{stage}' "
            f"(available for {stage}: {', '.join(for_stage)})"
        )
    return methods[name]
