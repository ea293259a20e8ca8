"""One shape for ftguard's plug-in registries (methods, attacks, judges, pairwise judges).

A registry is a dict from a lower-case name to what the name builds, so that tests can swap an entry with
``monkeypatch.setitem`` and put it back; on top of the dict it checks names when they register and gives the one
"unknown NAME; did you mean …? (available: …)" error that every config key naming a plug-in reports. Built-in
entries register themselves when their modules are imported: ``load_builtins`` imports them before a lookup, so
that the core never imports a plug-in by name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from ftguard.errors import FtguardError

T = TypeVar("T")

_REGISTRIES: list[Registry] = []


class Registry(dict[str, T], Generic[T]):
    """Named entries of one ``kind`` ("method", "attack", …)."""

    def __init__(self, kind: str, load_builtins: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.kind = kind
        self._load_builtins = load_builtins
        _REGISTRIES.append(self)

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; a second, different entry under the same name is a programming error."""
        if not name or name != name.lower() or any(c.isspace() for c in name):
            raise ValueError(f"{self.kind} name {name!r} must be a non-empty lower-case word")
        if name in self and self[name] is not entry:
            raise ValueError(
                f"{self.kind} {name!r} is registered twice ({_origin(self[name])}, {_origin(entry)})"
            )
        self[name] = entry
        return entry

    def loaded(self) -> dict[str, T]:
        """Every entry, the built-in ones imported first, sorted by name."""
        if self._load_builtins is not None:
            self._load_builtins()
        return dict(sorted(self.items()))

    def unknown(self, name: str, where: str = "", choices: Iterable[str] | None = None) -> str:
        """The error message for a ``name`` that is not registered (``where``: e.g. " for stage 'align'")."""
        names = sorted(self.loaded() if choices is None else choices)
        close = difflib.get_close_matches(name, list(self.loaded()), n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} '{name}'{where}{hint} (available: {', '.join(names) or 'none'})"

    def check_options(self, name: str, options: dict) -> None:
        """Fail when ``options`` holds a keyword that the constructor of ``name``'s entry does not take."""
        import inspect

        init = self.require(name)
        params = inspect.signature(init.__init__ if isinstance(init, type) else init).parameters.values()
        accepted = [
            p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise FtguardError(
                f"{self.kind} {name!r} has no option(s) {', '.join(unknown)}: "
                f"valid options are {', '.join(accepted) or 'none'}"
            )

    def require(self, name: str) -> T:
        """The entry of ``name``, or an :class:`FtguardError` that names the close ones."""
        entries = self.loaded()
        if name not in entries:
            raise FtguardError(self.unknown(name))
        return entries[name]


def all_registries() -> list[Registry]:
    """Every registry made so far (the test suite checks that none keeps a stand-in after a test)."""
    return list(_REGISTRIES)


def _origin(entry: object) -> str:
    return getattr(entry, "__module__", None) or type(entry).__module__
