"""Writing rosbag2 bags (mcap or sqlite3) through ``rosbags``, and ROS 1 bags for tests.

Messages of any kind (rosbags objects, rclpy, ROS 1) are copied into the writer's typestore
with :func:`~clip2scene_ros.typestore.convert_message`; a full disk or a failed close is
one :class:`BagError` line, and the bag is always finished with its metadata.yaml when the
disk allows it.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..typestore import convert_message, default_typestore, normalize_msgtype
from .safe_output import WRITER_MARK, WRITER_MARK_KEY, os_error_text, prepare_output_bag
from .types import BagError

log = logging.getLogger("clip2scene_ros.bag")


class BagWriter:
    """Write a rosbag2 directory (mcap by default, or sqlite3) that ``ros2 bag play`` reads.

    Messages may be rosbags objects of the writer's typestore (serialized as they are) or any
    duck-typed message (rclpy, ROS 1), which is first copied with :func:`convert_message`.
    ``compress`` zstd-compresses mcap chunks (ros2 bag's mcap plugin reads them natively).

    ``overwrite`` replaces only an empty folder or a bag a BagWriter wrote (metadata.yaml
    carries ``WRITER_MARK_KEY``; see :func:`check_output_bag`); anything else is refused with a
    :class:`BagError` naming the path and the reason. :meth:`close` (also on an exception
    inside ``with``) always finishes the bag with its metadata.yaml when the disk allows it.
    """

    def __init__(self, path: str | Path, *, storage: str = "mcap", compress: bool = True,
                 typestore: Any = None, overwrite: bool = False) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
        if storage not in ("mcap", "sqlite3"):
            raise BagError(f"unknown storage {storage!r} (mcap or sqlite3)")
        prepare_output_bag(self.path, overwrite, what="output bag")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BagError(f"output bag {self.path}: cannot create its folder: {os_error_text(exc)}") from exc
        self.storage = storage
        self.typestore = typestore or default_typestore(False)
        self._writer = Writer(self.path, version=Writer.VERSION_LATEST,
                              storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
        if compress and storage == "mcap":
            from rosbags.rosbag2 import CompressionFormat, CompressionMode

            self._writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        self._writer.set_custom_data(WRITER_MARK_KEY, WRITER_MARK)
        self._conns: dict[str, Any] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self._open = False
        #: False after a close that could not write the metadata (e.g. the disk is full)
        self.complete = True

    def open(self) -> "BagWriter":
        try:
            self._writer.open()
        except OSError as exc:
            raise BagError(f"output bag {self.path}: cannot create it: {os_error_text(exc)}") from exc
        except Exception as exc:
            raise BagError(f"output bag {self.path}: {exc}") from exc
        self._open = True
        return self

    def __enter__(self) -> "BagWriter":
        return self.open()

    def __exit__(self, exc_type, *_: object) -> None:
        # on an exception too: a partial bag is still useful and readable when it is closed
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except BagError as exc:   # the original exception is the one to report
            log.error("%s", exc)

    def set_custom_data(self, key: str, value: str) -> None:
        self._writer.set_custom_data(key, value)

    def connection(self, topic: str, msgtype: str, *, msgdef: str | None = None,
                   digest: str | None = None, qos: Sequence[Any] = ()) -> Any:
        msgtype = normalize_msgtype(msgtype)
        conn = self._conns.get(topic)
        if conn is None:
            if msgdef is not None and digest:
                conn = self._writer.add_connection(topic, msgtype, msgdef=msgdef, rihs01=digest,
                                                   offered_qos_profiles=qos)
            else:
                conn = self._writer.add_connection(topic, msgtype, typestore=self.typestore,
                                                   offered_qos_profiles=qos)
            self._conns[topic] = conn
        elif conn.msgtype != msgtype:
            raise BagError(f"topic {topic} already written with type {conn.msgtype}, not {msgtype}")
        return conn

    def _write(self, conn: Any, stamp_ns: int, data: bytes) -> None:
        try:
            self._writer.write(conn, int(stamp_ns), data)
        except OSError as exc:
            raise BagError(f"cannot write to the output bag {self.path}: {os_error_text(exc)}") from exc

    def write(self, topic: str, msg: Any, stamp_ns: int, msgtype: str | None = None, *,
              qos: Sequence[Any] = ()) -> None:
        """Serialize ``msg`` (its type from ``msgtype`` or ``msg.__msgtype__``) at bag time ``stamp_ns``.

        ``qos`` (rosbags ``Qos`` profiles) applies when the topic is first written, e.g.
        :func:`latched_qos` for /tf_static so late subscribers of ``ros2 bag play`` get it.
        """
        typ = normalize_msgtype(msgtype or getattr(msg, "__msgtype__", "") or _rclpy_type(msg))
        if not typ:
            raise BagError(f"cannot tell the message type of {type(msg).__name__} for {topic}")
        conn = self.connection(topic, typ, qos=qos)
        cls = self.typestore.types.get(typ)
        if cls is None or not isinstance(msg, cls):
            msg = convert_message(msg, typ, self.typestore)
        data = self.typestore.serialize_cdr(msg, typ)
        self._write(conn, stamp_ns, data)
        self.counts[topic] += 1

    def write_raw(self, topic: str, msgtype: str, data: bytes, stamp_ns: int,
                  source_typestore: Any = None) -> None:
        """Write already CDR-serialized bytes (copying a ROS 2 bag's topic verbatim).

        A type this writer's typestore does not know (a custom message) takes its definition
        from ``source_typestore`` (the input bag's).
        """
        msgtype = normalize_msgtype(msgtype)
        if topic not in self._conns and msgtype not in self.typestore.fielddefs:
            if source_typestore is None or msgtype not in source_typestore.fielddefs:
                raise BagError(f"no definition of {msgtype} to write {topic}")
            msgdef, _ = source_typestore.generate_msgdef(msgtype, ros_version=2)
            self.connection(topic, msgtype, msgdef=msgdef,
                            digest=source_typestore.hash_rihs01(msgtype))
        conn = self.connection(topic, msgtype)
        self._write(conn, stamp_ns, data)
        self.counts[topic] += 1

    def close(self) -> None:
        """Finish the bag (storage summary + metadata.yaml). Raises :class:`BagError` when that
        is impossible (disk full); the storage file is then closed without its summary."""
        if not self._open:
            return
        self._open = False
        try:
            self._writer.close()
        except Exception as exc:
            self.complete = False
            try:
                self._writer.abort()
            except Exception:  # noqa: BLE001
                pass
            text = os_error_text(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            raise BagError(f"output bag {self.path} could not be finished ({text}): it has no "
                           "metadata.yaml and may be cut short") from exc


def latched_qos(depth: int = 1) -> list[Any]:
    """Reliable, transient-local, keep-last QoS: what tf2 uses for /tf_static."""
    from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness,
                                    QosReliability, QosTime)

    infinite = QosTime(9223372036, 854775807)
    return [Qos(QosHistory.KEEP_LAST, depth, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL,
                infinite, infinite, QosLiveliness.AUTOMATIC, infinite, False)]


def _rclpy_type(msg: Any) -> str:
    """``sensor_msgs/msg/PointCloud2`` from an rclpy message instance (module path)."""
    mod = type(msg).__module__.split(".")
    if len(mod) >= 2 and mod[1] == "msg":
        return f"{mod[0]}/msg/{type(msg).__name__}"
    return ""


def write_ros1_bag(path: str | Path, messages: Iterable[tuple[str, str, int, Any]]) -> Path:
    """Write (topic, msgtype, time ns, msg) to a ROS 1 bag with rosbags' rosbag1 Writer.

    ROS 2 style messages are converted field by field to the Noetic definitions. Used by
    tests and to hand data to ROS 1 tools; the replay tool itself only writes rosbag2.
    """
    from rosbags.rosbag1 import Writer as Writer1
    from rosbags.typesys.store import Typestore

    store = Typestore()
    store.register(dict(default_typestore(True).fielddefs))
    ros2 = default_typestore(False)
    path = Path(path)
    conns: dict[str, Any] = {}
    with Writer1(path) as writer:
        for topic, msgtype, t, msg in messages:
            msgtype = normalize_msgtype(msgtype)
            if msgtype not in store.fielddefs:
                # Noetic's store lacks some packages (tf2_msgs): borrow the ROS 2 definition,
                # whose nested types then resolve to the ROS 1 ones (e.g. Header with seq)
                if msgtype not in ros2.fielddefs:
                    raise BagError(f"no ROS 1 definition of {msgtype}")
                store.register({msgtype: ros2.fielddefs[msgtype]})
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=store)
            ros1_msg = convert_message(msg, msgtype, store)
            writer.write(conns[topic], int(t), store.serialize_ros1(ros1_msg, msgtype))
    return path

