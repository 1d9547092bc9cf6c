"""rosbags typestores and the one walk over their field definitions (defaults, conversion).

Why one module: building a message with every field at its ROS default
(``msgs.MessageFactory.new``) and copying a message from one kind into a typestore's class
(rclpy, ROS 1 or any duck-typed object → rosbags, ``bag.convert_message``) walk the same
field definitions and need the same numpy array types. Kept apart they drifted (a bool
array default that rosbags could not serialize, fixed-size arrays of messages left empty).

A leaf module: numpy only at import time, rosbags imported where a typestore is built, so
``msgs.py`` (used by the node, where rosbags may be absent) and ``bag/`` both import it.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["NUMPY_TYPES", "normalize_msgtype", "default_typestore", "typestore_from_defs",
           "field_default", "convert_message"]

# rosbags ``Nodetype`` values of a field definition ``(kind, detail)``
BASE, NAME, ARRAY, SEQUENCE = 1, 2, 3, 4

#: ROS primitive → numpy dtype; arrays of these are numpy arrays in rosbags messages
NUMPY_TYPES: dict[str, type] = {
    "bool": np.bool_, "int8": np.int8, "uint8": np.uint8, "byte": np.uint8, "char": np.uint8,
    "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32,
    "int64": np.int64, "uint64": np.uint64, "float32": np.float32, "float64": np.float64,
}


def normalize_msgtype(name: str) -> str:
    """``sensor_msgs/PointCloud2`` (ROS 1) → ``sensor_msgs/msg/PointCloud2`` (ROS 2 style)."""
    parts = name.split("/")
    if len(parts) == 2:
        return f"{parts[0]}/msg/{parts[1]}"
    return name


def default_typestore(ros1: bool = False) -> Any:
    """rosbags typestore with the real ROS message definitions (Humble for ROS 2, Noetic)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)


def typestore_from_defs(defs: dict[str, tuple[str, str]], ros1: bool) -> Any:
    """Typestore from definitions embedded in a bag ({msgtype: (encoding, text)}), on top of
    the default store so types without an embedded definition still deserialize."""
    from rosbags.typesys import get_types_from_idl, get_types_from_msg
    from rosbags.typesys.store import Typestore

    # a fresh store object: get_typestore caches, so copy before registering bag types
    fresh = Typestore()
    fresh.register(dict(default_typestore(ros1).fielddefs))
    for msgtype, (encoding, text) in defs.items():
        if not text:
            continue
        try:
            if encoding == "ros2idl":
                sep = "=" * 80 + "\n"
                if text.startswith(f"{sep}IDL: "):
                    for part in text.split(sep)[1:]:
                        fresh.register(get_types_from_idl(part.split("\n", 1)[1]))
                else:
                    fresh.register(get_types_from_idl(text))
            else:
                fresh.register(get_types_from_msg(text, msgtype))
        except Exception as exc:  # noqa: BLE001 - a bad definition: keep the default one
            log.warning("ignoring unparsable definition of %s: %s", msgtype, exc)
    return fresh


class _Missing:
    """A field the source message does not have (takes its ROS default)."""


_MISSING = _Missing()


def _base_default(typ: str) -> Any:
    if typ in ("string", "wstring"):
        return ""
    if typ == "bool":
        return False
    return 0.0 if typ.startswith("float") else 0


def field_default(fdef: tuple, typestore: Any) -> Any:
    """ROS default of one rosbags field definition (nested messages filled recursively)."""
    return _convert_value(_MISSING, fdef, typestore)


def convert_message(msg: Any, msgtype: str, typestore: Any) -> Any:
    """Copy ``msg`` (rclpy, ROS 1 rosbags or any duck-typed object) into ``typestore``'s class.

    Fields are matched by name, case-insensitively (ROS 1 ``K`` → ROS 2 ``k``); fields the
    source lacks keep their defaults (e.g. ROS 1 ``Header.seq`` is dropped).
    """
    _, fields = typestore.fielddefs[msgtype]
    cls = typestore.types[msgtype]
    return cls(**{name: _convert_value(_get_field(msg, name), fdef, typestore)
                  for name, fdef in fields})


def _get_field(msg: Any, name: str) -> Any:
    if msg is _MISSING:
        return _MISSING
    for cand in (name, name.upper(), name.lower()):
        if hasattr(msg, cand):
            return getattr(msg, cand)
    if name == "nanosec" and hasattr(msg, "nsec"):  # ROS 1 time
        return msg.nsec
    if name == "sec" and hasattr(msg, "secs"):
        return msg.secs
    if name == "nanosec" and hasattr(msg, "nsecs"):
        return msg.nsecs
    return _MISSING


def _convert_value(value: Any, fdef: tuple, typestore: Any) -> Any:
    kind, detail = fdef
    kind = int(kind)
    if kind == BASE:
        typ = detail[0]
        if value is _MISSING:
            return _base_default(typ)
        if typ in ("string", "wstring"):
            return str(value)
        if typ == "bool":
            return bool(value)
        return float(value) if typ.startswith("float") else int(value)
    if kind == NAME:
        return convert_message(value, normalize_msgtype(detail), typestore)
    if kind not in (ARRAY, SEQUENCE):
        raise ValueError(f"unsupported field definition {fdef!r}")
    inner, length = detail
    size = length if kind == ARRAY else 0
    if int(inner[0]) == BASE and inner[1][0] in NUMPY_TYPES:
        dtype = NUMPY_TYPES[inner[1][0]]
        if value is _MISSING:
            return np.zeros(size, dtype=dtype)
        if isinstance(value, (bytes, bytearray, memoryview)):
            arr = np.frombuffer(bytes(value), dtype=np.uint8).astype(dtype, copy=False)
        else:
            arr = np.asarray(value, dtype=dtype)
        return np.ascontiguousarray(arr.reshape(-1))
    items = [_MISSING] * size if value is _MISSING else list(value)
    return [_convert_value(v, inner, typestore) for v in items]
