"""One typed schema machinery for recipes and export profiles.

A schema is a tree of dataclasses. :func:`load_config` reads YAML (with an optional ``_base_`` file to inherit
from), applies ``--set a.b=value`` overrides, and validates every key and type against the dataclasses before
anything runs, so a typo fails in the first second with a message naming the key, not an hour into training.
Range checks live in each dataclass's ``validate()``; use :func:`require` there. Every float field must be
finite (NaN or inf is refused for all of them, here), a name that becomes a path component goes through
:func:`check_name`, and YAML is read in one place (:func:`load_yaml`, UTF-8 files via :func:`read_yaml`) with
limits on nesting and alias expansion.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError
from .io import atomic_write

T = TypeVar("T")

__all__ = ["load_config", "from_dict", "to_dict", "dump_yaml", "parse_overrides", "require", "read_yaml", "load_yaml",
           "check_name", "check_path", "MAX_NAME_BYTES", "MAX_IMG_SIZE", "MAX_BATCH", "MAX_YAML_DEPTH",
           "MAX_YAML_VALUES"]

# A name mffzoo turns into one path component (run name, zoo tag, Triton model name, an output file's name) may
# have this many bytes: file systems allow 255 per component (ENAMETOOLONG beyond), and mffzoo adds suffixes and
# temporary names next to it (".parity.json", ".<name>.tmp-XXXXXXXX", "<tag>-partial", "<name>_ensemble").
MAX_NAME_BYTES = 200
# Beyond these an input cannot work on any machine (a 100,000 px ViT input has 39 M patches; a parity check at
# batch 10^6 allocates terabytes) and fails in an allocation, minutes in, instead of in one line at load.
MAX_IMG_SIZE = 4096
MAX_BATCH = 4096
# YAML limits: a recipe or profile holds a few hundred values, 3 or 4 levels deep. Every consumer (merging,
# validation, the recipe.yaml written to a run) expands aliases, so a few lines of nested aliases ("billion
# laughs") would become 10^9 values, and 10,000 nested brackets overflow Python's recursion.
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 100_000


def require(cond: bool, key: str, message: str) -> None:
    """Raise a one-line :class:`ConfigError` for ``key`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


def _shown(value: str, limit: int = 60) -> str:
    """``value`` for an error line: repr'd (control characters visible), long ones cut."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _label(key: str) -> str:
    """How an error line names ``key``: a recipe/profile key as ``config key 'a.b'``, a CLI option or argument
    (``--output``, ``DST``) or a description (``config file``) as itself."""
    return key if key.startswith("-") or key.isupper() or " " in key else f"config key '{key}'"


def check_name(value: str, key: str) -> str:
    """``value`` if it is a plain folder name, else a one-line :class:`ConfigError` naming ``key``.

    For names mffzoo turns into one path component under a folder of its own (runs/<name>, <zoo home>/<arch>.<tag>,
    a Triton model folder): a '/', '..' or an absolute path would write outside that folder, a control character
    makes a name no shell shows right, and a long one fails in the file system (ENAMETOOLONG) after the work.
    """
    why = None
    if not value:
        why = "is empty"
    elif value in (".", ".."):
        why = "is '.' or '..', not a folder name"
    elif "/" in value or "\\" in value or os.sep in value:
        why = "contains a path separator (it would write outside its folder)"
    elif not value.isprintable():
        why = "contains a control or unprintable character"
    elif len(value.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        why = f"is {len(value.encode('utf-8', 'surrogateescape'))} bytes long, over the limit of {MAX_NAME_BYTES}"
    if why:
        raise ConfigError(f"{_label(key)}: {_shown(value)} {why}; it becomes a folder name, so use a plain name "
                          f"of at most {MAX_NAME_BYTES} bytes (letters, digits, '-', '_', '.'), e.g. my_run")
    return value


def check_path(value: str | os.PathLike[str], key: str, *, existing: bool = False) -> Path:
    """``value`` as a Path if the file system can hold it, else a one-line :class:`ConfigError` naming ``key``.

    A path the user names may go anywhere, but each of its components must fit the file system's 255 bytes
    (beyond, even ``Path.exists()`` raises ENAMETOOLONG), the last one of a path mffzoo writes
    :data:`MAX_NAME_BYTES` (it writes sidecars and temporary files next to it; ``existing``: a file to read, 255),
    and it holds no NUL.
    """
    path = Path(value).expanduser()
    text = os.fspath(path)
    if "\0" in text:
        raise ConfigError(f"{_label(key)}: the path {_shown(text)} contains a NUL byte; pass a real path")
    if len(text.encode("utf-8", "surrogateescape")) >= 4096:
        raise ConfigError(f"{_label(key)}: the path {_shown(text)} is longer than the 4095 bytes a path may have; "
                          "pass a shorter path")
    parts = path.parts
    for i, part in enumerate(parts):
        n = len(part.encode("utf-8", "surrogateescape"))
        limit = MAX_NAME_BYTES if i == len(parts) - 1 and not existing else 255
        if n > limit:
            raise ConfigError(f"{_label(key)}: the path component {_shown(part, 40)} is {n} bytes long, over "
                              f"the limit of {limit} (file systems allow 255 bytes per name"
                              + ("; mffzoo writes files named after an output next to it" if limit < 255 else "")
                              + "); pass a shorter path")
    return path


class _BadValue(ConfigError):
    """The value has the right type but cannot work (e.g. NaN): a union type must not hide this message."""


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
            except _BadValue:
                raise
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
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float's range (whose repr may be too long to print)
                raise _BadValue(f"config key '{key}': got an integer beyond the range of a float; write a plain "
                                "number such as 1e-3") from None
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # every float field: no schedule, statistic or gate works with NaN/inf
                raise _BadValue(f"config key '{key}': must be a finite number, got {value!r}; write a plain number "
                                "such as 1e-3")
            return number
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


class _YamlLimit(Exception):
    """A YAML document over :data:`MAX_YAML_DEPTH` or :data:`MAX_YAML_VALUES`; :func:`load_yaml` names the source."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


class _LimitedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses deep nesting while composing (before Python's recursion limit is near) and,
    before constructing, a node graph whose aliases expand to too many values or levels, or refer to themselves."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlLimit(f"nests deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Any) -> Any:
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Count the values and levels of ``root`` with every alias expanded (memoised per node, so a bomb costs no
    more to measure than its text); the recursion stops at :data:`MAX_YAML_DEPTH`."""
    measured: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        known = measured.get(id(node))
        if known is not None:
            return known
        if id(node) in active:
            raise _YamlLimit("refers to itself through an alias (a recursive structure)", node.start_mark)
        if depth > MAX_YAML_DEPTH:
            raise _YamlLimit(f"nests deeper than {MAX_YAML_DEPTH} levels once its aliases are expanded",
                             node.start_mark)
        active.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        count, height = 1, 1
        for child in children:
            n, h = measure(child, depth + 1)
            count, height = count + n, max(height, h + 1)
            if count > MAX_YAML_VALUES:
                raise _YamlLimit(f"expands to more than {MAX_YAML_VALUES} values through its aliases (*name)",
                                 node.start_mark)
            if depth + h > MAX_YAML_DEPTH:
                raise _YamlLimit(f"nests deeper than {MAX_YAML_DEPTH} levels once its aliases are expanded",
                                 child.start_mark)
        active.discard(id(node))
        measured[id(node)] = (count, height)
        return count, height

    measure(root, 1)


def load_yaml(text: str, where: str) -> Any:
    """The one place YAML text becomes data: safe tags only, nesting and alias expansion limited.

    ``where`` names the source for the error line (``config file 'x.yaml'``, ``override 'optim.lr'``). A document
    over a limit is a one-line :class:`ConfigError`; a syntax error stays a ``yaml.YAMLError`` for the caller.
    """
    try:
        return yaml.load(text, Loader=_LimitedLoader)  # noqa: S506 - a SafeLoader subclass
    except _YamlLimit as exc:
        line = f" at line {exc.mark.line + 1}" if exc.mark is not None else ""
        raise ConfigError(f"{where} {exc.problem}{line}; a recipe or profile needs a few levels and a few hundred "
                          f"values (limits {MAX_YAML_DEPTH} levels, {MAX_YAML_VALUES} values): write the values out "
                          "plainly") from None


def _decode(raw: bytes, path: Path) -> str:
    """The text of a config file: UTF-8 (a UTF-8 byte-order mark is dropped), or UTF-16 with its byte-order mark
    (what Windows editors and PowerShell's ``>`` write; the mark makes it unambiguous, and YAML allows it). Any
    other encoding is refused in one line naming the first byte that is not UTF-8."""
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise ConfigError(f"config file '{path}' is UTF-32 text; save it as UTF-8")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise ConfigError(f"config file '{path}' starts with a UTF-16 byte-order mark but is not valid UTF-16; "
                              "save it as UTF-8") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}; "
                          "Latin-1 or another legacy encoding?); save it as UTF-8, e.g. iconv -f latin1 -t utf-8 "
                          f"'{path}' > fixed.yaml") from None


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
            value = load_yaml(raw, f"override '{'.'.join(parts)}':") if raw.strip() else ""
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
    path = check_path(path, "config file", existing=True)  # an over-long name: is_file() itself would raise
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file (see recipes/)")
    if path.resolve() in _seen:
        raise ConfigError(f"config file '{path}' inherits from itself through _base_")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read ({exc.strerror}); check its permissions") from None
    try:
        data = load_yaml(_decode(raw, path), f"config file '{path}'") or {}
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
    """Write the fully resolved config so a run directory says exactly what ran (atomically: a full disk
    leaves the previous file whole and raises one WriteFailed line)."""
    atomic_write(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
