"""Typed configuration: YAML files under ``config/`` loaded into dataclasses.

Unknown keys are rejected with the dotted path of the offending key, so a typo in a
config file fails loudly at start-up instead of silently falling back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


#: the scalar types `check_scalar` knows (YAML configs and ROS parameters alike)
SCALAR_TYPES: tuple[type, ...] = (bool, int, float, str, Path)


def check_scalar(value: Any, tp: type, path: str) -> Any:
    """``value`` as scalar ``tp`` (one of `SCALAR_TYPES`), else a ConfigError naming ``path``.

    The one type check of configuration values, shared by the YAML loader (`from_dict`) and
    the node's ROS parameters (``clip2scene_ros.node_config.check_type``): an integer is fine
    for a float, a bool is never a number, a path may be given as a string.
    """
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{path}: expected a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to ``tp`` (dataclass, Optional, list, tuple, dict, scalars)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        kt, vt = (args or (Any, Any))
        return {_convert(k, kt, f"{path}.<key>"): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp in SCALAR_TYPES:
        return check_scalar(value, tp, path)
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key_path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_path}: required key is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML/JSON/torch.save-safe) form of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


#: largest YAML file read (config and params files are a few KB)
MAX_YAML_BYTES = 1 << 20
#: values (scalars + collections) a YAML document may hold once every alias is expanded: a
#: 1 KB "billion laughs" file otherwise expands to 10^9 values when walked or printed
MAX_YAML_VALUES = 200_000
#: nesting depth of a YAML document (configs nest 3-4 levels)
MAX_YAML_DEPTH = 64


def _clip(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _check_yaml_graph(root: Any, p: Path, aliases: bool) -> None:
    """Refuse (before any Python object is built) alias loops, aliases when not allowed, and
    documents that expand beyond `MAX_YAML_VALUES` values or `MAX_YAML_DEPTH` levels.

    Iterative and linear in the composed nodes: an alias is the same node object met twice.
    """
    visiting = object()
    state: dict[int, Any] = {}          # node id → visiting, or its expanded value count
    depth = 0
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = ()
        key = id(node)
        if done:
            depth -= 1
            state[key] = 1 + sum(state[id(c)] for c in children)
            if state[key] > MAX_YAML_VALUES:
                raise ConfigError(f"{p}: the YAML holds more than {MAX_YAML_VALUES} values once "
                                  "its aliases are expanded; refused")
            continue
        seen = state.get(key)
        if seen is visiting:
            raise ConfigError(f"{p}: a YAML alias refers to a node that contains it (a loop)")
        if seen is not None:
            if not aliases:
                raise ConfigError(f"{p}: YAML aliases (*name) are not supported here, as in "
                                  "ROS 2's own params parser: write the values out")
            continue
        depth += 1
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{p}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
        state[key] = visiting
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(children))


def load_yaml(path: str | Path, *, aliases: bool = True,
              max_bytes: int = MAX_YAML_BYTES) -> dict[str, Any]:
    """Read a YAML mapping; every problem with the file is one ``ConfigError``.

    Missing, not a regular file, over ``max_bytes``, not UTF-8 text (a binary file), invalid
    YAML, a document expanding to more than `MAX_YAML_VALUES` values or nested deeper than
    `MAX_YAML_DEPTH` (an alias bomb), or a top level that is not a mapping. ``aliases=False``
    refuses ``*alias`` references altogether (ROS 2 params files: rcl's parser refuses them).
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if not p.is_file():
        raise ConfigError(f"{p}: not a regular file")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise ConfigError(f"{p}: larger than {max_bytes} bytes; not a config file?")
    try:
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") \
            else raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a YAML text file (not UTF-8 at byte {exc.start}; "
                          "a binary file?)") from None
    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        loader = loader_cls(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {_clip(str(exc))}") from None
    try:
        try:
            node = loader.get_single_node()
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"{p}: invalid YAML: {_clip(str(exc))}") from None
        if node is not None:
            _check_yaml_graph(node, p, aliases)
        try:
            data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML: {_clip(str(exc))}") from None
        except Exception as exc:  # noqa: BLE001 - e.g. ValueError of a date like 2020-99-99
            raise ConfigError(f"{p}: invalid YAML value: {type(exc).__name__}: "
                              f"{_clip(str(exc))}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Load ``cls`` from a YAML file (optionally one top-level ``section`` of it)."""
    data = load_yaml(path)
    if section is not None:
        if section not in data:
            raise ConfigError(f"{path}: missing section '{section}'")
        data = data[section]
    return from_dict(cls, data, section or "")
