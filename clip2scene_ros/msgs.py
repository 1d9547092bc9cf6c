"""Message-class factory: build ROS messages with or without rclpy.

The converters in this package must create messages in two worlds: inside a sourced ROS 2
workspace (rclpy's generated classes, which take keyword arguments and fill defaults) and
in the replay tool / tests where only ``rosbags`` is installed (its typestore classes are
dataclasses that need every field). ``MessageFactory`` hides that difference: ask it for a
class by short name (``factory.PointCloud2``) and build instances with ``factory.new(...)``,
which fills every field you leave out with its ROS default. Reading code never needs the
factory: it duck-types on attribute names, so it accepts either kind of message. Large
``uint8[]`` payloads (a labelled cloud's data) are written once into the backend's own
container (`MessageFactory.uint8_buffer`) and attached with `MessageFactory.set_uint8`,
never copied on the way into the message.
"""
from __future__ import annotations

import array
import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clip2scene_core.errors import Clip2SceneError

from .typestore import field_default

__all__ = [
    "MessageFactory", "default_factory", "make_time", "make_header", "stamp_to_ns", "ns_to_stamp",
    "header_stamp_ns", "uint8_data", "data_as_array", "MESSAGE_TYPES",
]

# Short name → full ROS 2 type name. The rclpy backend imports ``<pkg>.msg`` for these.
MESSAGE_TYPES: dict[str, str] = {
    "Time": "builtin_interfaces/msg/Time",
    "Header": "std_msgs/msg/Header",
    "PointField": "sensor_msgs/msg/PointField",
    "PointCloud2": "sensor_msgs/msg/PointCloud2",
    "Image": "sensor_msgs/msg/Image",
    "CompressedImage": "sensor_msgs/msg/CompressedImage",
    "CameraInfo": "sensor_msgs/msg/CameraInfo",
    "RegionOfInterest": "sensor_msgs/msg/RegionOfInterest",
    "Vector3": "geometry_msgs/msg/Vector3",
    "Quaternion": "geometry_msgs/msg/Quaternion",
    "Transform": "geometry_msgs/msg/Transform",
    "TransformStamped": "geometry_msgs/msg/TransformStamped",
    "TFMessage": "tf2_msgs/msg/TFMessage",
}

_NS = 1_000_000_000


class MessageFactoryError(Clip2SceneError, LookupError):
    """A message type or backend is not available."""


@dataclass
class MessageFactory:
    """Message classes of one backend, looked up by short name (``factory.Image``).

    ``backend`` is ``"rclpy"`` or ``"rosbags"``; ``typestore`` is the rosbags typestore for
    the latter (its ``serialize_cdr`` / ``deserialize_cdr`` work on the classes it hands out).
    """

    backend: str
    typestore: Any = None
    _classes: dict[str, type] = field(default_factory=dict, repr=False)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_rosbags(cls, store: Any = "ROS2_HUMBLE") -> "MessageFactory":
        """rosbags typestore classes; ``store`` is a ``rosbags.typesys.Stores`` member or its name."""
        from rosbags.typesys import Stores, get_typestore

        if isinstance(store, str):
            try:
                store = Stores[store.upper()]
            except KeyError:
                raise MessageFactoryError(
                    f"unknown rosbags store '{store}' (have {[s.name for s in Stores]})") from None
        return cls("rosbags", get_typestore(store))

    @classmethod
    def from_rclpy(cls) -> "MessageFactory":
        """rclpy's generated classes; MessageFactoryError when ROS 2 is not sourced."""
        try:
            importlib.import_module("sensor_msgs.msg")
        except ImportError as exc:
            raise MessageFactoryError(f"ROS 2 message packages are not importable: {exc}") from None
        return cls("rclpy")

    # -- lookup ---------------------------------------------------------------------------------
    def get(self, name: str) -> type:
        """Class of a message type: a short name (``"Image"``) or ``pkg/msg/Type``."""
        full = MESSAGE_TYPES.get(name, name)
        if full in self._classes:
            return self._classes[full]
        if "/" not in full:
            raise MessageFactoryError(f"unknown message type '{name}' (use pkg/msg/Type)")
        if self.backend == "rosbags":
            try:
                cls = self.typestore.types[full]
            except KeyError:
                raise MessageFactoryError(f"rosbags typestore has no type '{full}'") from None
        elif self.backend == "rclpy":
            pkg, _, typ = full.split("/")
            try:
                cls = getattr(importlib.import_module(f"{pkg}.msg"), typ)
            except (ImportError, AttributeError) as exc:
                raise MessageFactoryError(f"cannot import {full} from rclpy: {exc}") from None
        else:
            raise MessageFactoryError(f"unknown backend '{self.backend}'")
        self._classes[full] = cls
        return cls

    def __getattr__(self, name: str) -> type:
        # Only short names are resolved here, so typos in ordinary attributes still fail.
        if name in MESSAGE_TYPES:
            return self.get(name)
        raise AttributeError(name)

    def type_name(self, name: str) -> str:
        """Full ``pkg/msg/Type`` name of a short name."""
        return MESSAGE_TYPES.get(name, name)

    # -- instances ------------------------------------------------------------------------------
    def new(self, msg_type: str, /, **fields: Any) -> Any:
        """Message ``msg_type`` (short or full name) with the given fields; missing ones get ROS defaults.

        rclpy fills defaults itself. rosbags dataclasses need every field, so they are
        completed from the typestore's field definitions (``typestore.field_default``).
        """
        cls = self.get(msg_type)
        if self.backend != "rosbags":
            return cls(**fields)
        full = self.type_name(msg_type)
        known = [fname for fname, _ in self.typestore.fielddefs[full][1]]
        unknown = set(fields) - set(known)
        if unknown:
            raise MessageFactoryError(f"{full} has no field(s) {sorted(unknown)} (fields: {known})")
        for fname, fdef in self.typestore.fielddefs[full][1]:
            if fname not in fields:
                fields[fname] = field_default(fdef, self.typestore)
        return cls(**fields)

    def uint8_data(self, raw: bytes | bytearray | memoryview | np.ndarray) -> Any:
        """A ``uint8[]`` field value this backend accepts (numpy for rosbags, array for rclpy)."""
        return uint8_data(raw, self.backend)

    def uint8_buffer(self, nbytes: int) -> tuple[Any, np.ndarray]:
        """(a zeroed ``uint8[]`` field value of ``nbytes`` for this backend, a writable numpy
        view of the same memory): what is written through the view is the message's data, so
        a cloud is filled once and never copied (`set_uint8` hands it over)."""
        if self.backend == "rclpy":
            # rclpy keeps an array.array('B'); repeating one zero byte is a memset
            value = array.array("B", b"\0") * int(nbytes)
            return value, np.frombuffer(value, dtype=np.uint8) if nbytes else np.zeros(0, np.uint8)
        value = np.zeros(int(nbytes), dtype=np.uint8)
        return value, value

    def set_uint8(self, msg: Any, name: str, value: Any) -> Any:
        """``msg.<name> = value`` for a value from `uint8_buffer`, without a copy; returns msg.

        rclpy's generated setters (Jazzy on) copy an ``array.array`` unless the message checks
        its fields, and the constructor copies its ``data`` argument: a 20 MB sweep would be
        copied twice. The checked setter keeps the array as is; that is what is done here,
        through the setter when it keeps it, else through the slot it stores it in.
        """
        slot = "_" + name
        if (self.backend == "rclpy" and isinstance(value, array.array) and value.typecode == "B"
                and getattr(msg, "_check_fields", True) is False
                and slot in getattr(type(msg), "__slots__", ())):
            setattr(msg, slot, value)
        else:
            setattr(msg, name, value)
        return msg

    def float64_array(self, values: Any) -> Any:
        """A ``float64[]``/``float64[n]`` field value: numpy for rosbags, list for rclpy."""
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        return arr if self.backend == "rosbags" else arr.tolist()


_DEFAULT: MessageFactory | None = None


def default_factory() -> MessageFactory:
    """rclpy's classes when ROS 2 is sourced, rosbags' (ROS 2 Humble definitions) otherwise."""
    global _DEFAULT
    if _DEFAULT is None:
        try:
            _DEFAULT = MessageFactory.from_rclpy()
        except MessageFactoryError:
            _DEFAULT = MessageFactory.from_rosbags()
    return _DEFAULT


def uint8_data(raw: bytes | bytearray | memoryview | np.ndarray, backend: str = "rosbags") -> Any:
    """Wrap raw bytes for a ``uint8[]`` message field of ``backend``."""
    if isinstance(raw, np.ndarray):
        if (backend == "rosbags" and raw.dtype == np.uint8 and raw.ndim == 1
                and raw.flags.c_contiguous and raw.flags.writeable and raw.base is None):
            return raw  # a fresh buffer the caller handed over: no need to copy it again
        buf = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    else:
        buf = np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8)
    if backend == "rosbags":
        return np.array(buf, dtype=np.uint8, copy=True)
    out = array.array("B")
    out.frombytes(buf)   # one copy (frombytes reads any contiguous buffer)
    return out


def data_as_array(data: Any) -> np.ndarray:
    """A message's ``uint8[]`` field as a 1-D uint8 numpy array, without copying when possible.

    Accepts what either backend stores: numpy arrays (rosbags), ``array.array('B')`` / bytes
    (rclpy) and plain lists of ints.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            data = np.ascontiguousarray(data).view(np.uint8)
        return data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview, array.array)):
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8).reshape(-1)


def stamp_to_ns(stamp: Any) -> int:
    """Nanoseconds since the epoch of a Time (ROS 2 ``sec``/``nanosec``, ROS 1 ``secs``/``nsecs``)."""
    if isinstance(stamp, (int, np.integer)):
        return int(stamp)
    if hasattr(stamp, "nanosec"):
        return int(stamp.sec) * _NS + int(stamp.nanosec)
    if hasattr(stamp, "nsecs"):
        return int(stamp.secs) * _NS + int(stamp.nsecs)
    if hasattr(stamp, "nanoseconds"):  # rclpy.time.Time
        return int(stamp.nanoseconds)
    raise TypeError(f"not a time stamp: {stamp!r}")


def header_stamp_ns(msg: Any) -> int:
    """Stamp of a message's header in nanoseconds."""
    return stamp_to_ns(msg.header.stamp)


def ns_to_stamp(ns: int, factory: MessageFactory | None = None) -> Any:
    """``builtin_interfaces/Time`` for ``ns`` nanoseconds (floor division, so nanosec ∈ [0, 1e9))."""
    factory = factory or default_factory()
    sec, nanosec = divmod(int(ns), _NS)
    return factory.new("Time", sec=int(sec), nanosec=int(nanosec))


def make_time(ns: int, factory: MessageFactory | None = None) -> Any:
    """Alias of ``ns_to_stamp``."""
    return ns_to_stamp(ns, factory)


def make_header(stamp_ns: int, frame_id: str, factory: MessageFactory | None = None) -> Any:
    """``std_msgs/Header`` with the given stamp and frame (``seq`` = 0 on ROS 1 stores)."""
    factory = factory or default_factory()
    return factory.new("Header", stamp=ns_to_stamp(stamp_ns, factory), frame_id=str(frame_id))
