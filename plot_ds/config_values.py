"""Config values checked against their annotated types, converted only where that is lossless."""
from __future__ import annotations

import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


def coerce(key: str, value: Any, expected: Any) -> Any:
    """Check one value against its annotated type; convert only where it is lossless."""
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        if not errors:
            raise ConfigError(f"{key}: bad value {value!r}")
        raise ConfigError("; or ".join([errors[0]] + [e.split(": ", 1)[-1] for e in errors[1:]]))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        key_type, value_type = args
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (e.g. {{dpo: 1.0, sft: 0.2}}), got {value!r}")
        return {coerce(f"{key} (a name)", name, key_type): coerce(f"{key}.{name}", item, value_type)
                for name, item in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args)))
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-6" (no dot) as a string; float() is a parser, not an eval.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {expected}")  # pragma: no cover - schema bug
