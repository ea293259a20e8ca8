"""Strict conversion of plain YAML data into typed dataclasses.

Every config object in ftguard (the run config and each method's own config) is a dataclass. ``from_dict``
builds one from a mapping and fails at once, naming the full key, on an unknown key, a wrong type or a
value outside a ``Literal``. Range checks live in each dataclass's ``__post_init__`` and raise
:class:`ConfigError` too.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, TypeVar, Union

from ftguard.errors import FtguardError

T = TypeVar("T")


class ConfigError(FtguardError):
    """A config key or value is wrong; the message names the key."""


def did_you_mean(name: str, options: typing.Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest option, or ''."""
    matches = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    options = [a for a in args if a is not type(None)]
    if value is None and len(options) < len(args):
        return None
    if len(options) == 1:
        return _convert(value, options[0], key)
    errors = []
    for option in options:
        try:
            return _convert(value, option, key)
        except ConfigError as exc:
            errors.append((option, exc))
    # Report the error of the option the value was evidently meant for (a mapping for a section, a list...).
    for option, exc in errors:
        if (isinstance(value, dict) and dataclasses.is_dataclass(option)) or (
            isinstance(value, list) and typing.get_origin(option) is list
        ):
            raise exc
    raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r}")


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-5" (no dot) as a string; accept what is unambiguously a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for '{key}'")  # a bug in a schema, not user input


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"'{key}' must be null, got {value!r}")
    if origin is Literal:
        options = typing.get_args(tp)
        # YAML 1.1 reads a bare `no` as false: take it back when "no" is the option meant.
        if value is False and "no" in options:
            return "no"
        if value in options and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    return _convert_scalar(value, tp, key)


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix or cls.__name__}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"unknown key '{full}'{did_you_mean(str(key), fields)} (known: {known})")
        kwargs[key] = _convert(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # __post_init__ checks name the bare field; give it its full dotted path.
        msg = str(exc)
        if prefix and msg.startswith("'") and not msg.startswith(f"'{prefix}."):
            raise ConfigError(f"'{prefix}.{msg[1:]}") from None
        raise


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) dataclass, for YAML/JSON output."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError naming ``key`` unless ``condition`` holds (for ``__post_init__`` checks)."""
    if not condition:
        raise ConfigError(f"'{key}' {message}")


def field_help(cls: type) -> dict[str, str]:
    """The ``help`` metadata of each field (shown by ``ftguard methods --verbose``)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
