"""One typed schema machinery for recipes and export profiles.

A schema is a tree of dataclasses. :func:`load_config` reads YAML (with an optional ``_base_`` file to inherit
from), applies ``--set a.b=value`` overrides, and validates every key and type against the dataclasses before
anything runs, so a typo fails in the first second with a message naming the key, not an hour into training.
Range checks live in each dataclass's ``validate()``; use :func:`require` there.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError

T = TypeVar("T")

__all__ = ["load_config", "from_dict", "to_dict", "dump_yaml", "parse_overrides", "require"]


def require(cond: bool, key: str, message: str) -> None:
    """Raise a one-line :class:`ConfigError` for ``key`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " (or null)"
    if origin in (list, tuple, Sequence):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; only lossless coercions (int -> float, str -> Path)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping of sub-keys, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        vt = get_args(tp)[1] if get_args(tp) else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value).expanduser()
    else:
        raise TypeError(f"unsupported schema annotation {tp!r} for '{key}'")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build and validate dataclass ``cls`` from plain data; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        name = str(raw_key)
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"under '{prefix}'" if prefix else "at top level"
            raise ConfigError(f"unknown config key '{key}'{hint}; allowed {where}: {', '.join(fields)}")
        kwargs[name] = _coerce(value, hints[name], key)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"config key '{key}' is required ({_type_name(hints[missing[0]])})")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view (YAML/JSON safe) of a config tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "data.root=/x"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not KEY=VALUE; write e.g. --set optim.lr=1e-3")
        dotted, raw = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}' has an empty key; write e.g. --set optim.lr=1e-3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return tree


def read_yaml(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, resolving ``_base_: other.yaml`` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file (see recipes/)")
    if path.resolve() in _seen:
        raise ConfigError(f"config file '{path}' inherits from itself through _base_")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config key '_base_' in '{path}': expected a file path string, got {base!r}")
        data = _deep_merge(read_yaml(path.parent / base, (*_seen, path.resolve())), data)
    return data


def load_config(
    cls: type[T],
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Load ``cls`` from a YAML file or mapping plus ``KEY=VALUE`` overrides, validated."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = read_yaml(source)
    data = _deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def dump_yaml(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write the fully resolved config so a run directory says exactly what ran."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
