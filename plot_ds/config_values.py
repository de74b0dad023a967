"""Config keys and values: dotted keys and YAML trees applied to a config of dataclass sections,
each value checked against its annotated type and converted only where that is lossless."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from pathlib import Path

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message names the key."""

    kind = "config"


def _coerce_to_one_of(key: str, value: Any, options: tuple) -> Any:
    """A value of a Union: the first option it converts to; else every option's complaint."""
    if value is None and type(None) in options:
        return None
    errors = []
    for option in (a for a in options if a is not type(None)):
        try:
            return coerce(key, value, option)
        except ConfigError as err:
            errors.append(str(err))
    if not errors:
        raise ConfigError(f"{key}: bad value {value!r}")
    raise ConfigError("; or ".join([errors[0]] + [e.split(": ", 1)[-1] for e in errors[1:]]))


def coerce(key: str, value: Any, expected: Any) -> Any:
    """Check one value against its annotated type; convert only where it is lossless."""
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return _coerce_to_one_of(key, value, args)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        key_type, value_type = args
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (e.g. {{dpo: 1.0, sft: 0.2}}), got {value!r}")
        return {
            coerce(f"{key} (a name)", name, key_type): coerce(f"{key}.{name}", item, value_type)
            for name, item in value.items()
        }
    if origin is list:
        if isinstance(value, str):  # a dotted override: comma-separated names
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list (e.g. [q_proj, v_proj]), got {value!r}")
        return [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
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


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    prefix, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def apply_override(config, key: str, value: Any) -> None:
    """Set ``section.key`` of a config of dataclass sections, the value checked against its type."""
    parts = key.split(".")
    if len(parts) != 2:
        sections = [f.name for f in dataclasses.fields(config)]
        if len(parts) == 1 and parts[0] in sections:
            raise ConfigError(f"'{key}' is a section; set its keys, e.g. '{key}.<key>'")
        raise ConfigError(
            f"unknown config key '{key}': keys look like 'section.key' with section one of {', '.join(sections)}"
        )
    section_name, name = parts
    section = getattr(config, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        close = difflib.get_close_matches(section_name, [f.name for f in dataclasses.fields(config)], n=1)
        hint = f" (did you mean '{close[0]}.{name}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}'{hint}")
    types_ = typing.get_type_hints(type(section))
    if name not in types_:
        raise _unknown_key(key, list(types_))
    setattr(section, name, coerce(key, value, types_[name]))


def flatten_sections(tree: dict, source: str) -> dict[str, Any]:
    """A YAML tree of sections -> {"section.key": value}."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    flat = {}
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys to values")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``--train.lr 1e-6`` or ``--train.lr=1e-6`` -> {"train.lr": 1e-6}; values parsed as YAML."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg[2:]}: missing value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            overrides[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {err.problem}") from None
    return overrides


def read_yaml_file(path: Path, what: str) -> Any:
    """A YAML file's content (``yaml.safe_load``: never code), or a one-line error naming it."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
