"""Method registry: a method registers itself by name and stage with one decorator.

Used at the edges (config validation, CLI); the core never imports a method by name.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from ftguard.errors import FtguardError

if TYPE_CHECKING:
    from ftguard.methods.base import Method

STAGE_NAMES = ("align", "finetune", "post")
_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` under ``cls.name`` (lower-case, unique) for ``cls.stages``."""
    name = cls.name
    if not name or name != name.lower() or " " in name:
        raise ValueError(f"method name {name!r} must be a non-empty lower-case word")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(
            f"method {name!r} is registered twice ({_METHODS[name].__module__}, {cls.__module__})"
        )
    bad = [s for s in cls.stages if s not in STAGE_NAMES]
    if not cls.stages or bad:
        raise ValueError(f"method {name!r} has invalid stages {cls.stages!r}; use {STAGE_NAMES}")
    _METHODS[name] = cls
    return cls


def all_methods() -> dict[str, type[Method]]:
    from ftguard.methods import load_builtin_methods

    load_builtin_methods()
    return dict(sorted(_METHODS.items()))


def get_method(name: str, stage: str) -> type[Method]:
    methods = all_methods()
    for_stage = [n for n, m in methods.items() if stage in m.stages]
    if name not in methods:
        close = difflib.get_close_matches(name, list(methods), n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise FtguardError(
            f"unknown method '{name}' for stage '{stage}'{hint} (available: {', '.join(for_stage)})"
        )
    if stage not in methods[name].stages:
        raise FtguardError(
            f"method '{name}' runs in stage(s) {', '.join(methods[name].stages)}, not '{stage}' "
            f"(available for {stage}: {', '.join(for_stage)})"
        )
    return methods[name]
