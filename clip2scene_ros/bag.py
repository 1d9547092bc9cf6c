"""rosbag2 (mcap, sqlite3) and ROS 1 bag reading and rosbag2 writing through ``rosbags``.

Why not just ``rosbags.highlevel.AnyReader``: recordings end badly (a robot loses power, a
disk fills, a file is cut when copied). rosbags refuses an mcap without its footer, a ROS 1
bag without its index, and stops at the first unreadable sqlite page or chunk. Replay should
instead evaluate every frame that survived and say how much was lost, so :class:`BagReader`
uses rosbags for healthy bags and falls back to small record scanners (mcap records, sqlite
rows one by one, ROS 1 records) for damaged ones, counting what it skipped in
:class:`ReadReport`.

Messages come back deserialized as rosbags message objects (ROS 2 field names for rosbag2,
ROS 1 names such as ``K`` / ``D`` for ROS 1 bags; the converters in this package accept both).
"""
from __future__ import annotations

import bz2
import errno
import heapq
import shutil
import tempfile
import logging
import sqlite3
import struct
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clip2scene_core.errors import Clip2SceneError

from .pointcloud2 import UNLABELED

log = logging.getLogger(__name__)

POINTCLOUD2 = "sensor_msgs/msg/PointCloud2"
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
TF_MESSAGE = "tf2_msgs/msg/TFMessage"
STRING = "std_msgs/msg/String"

#: message kinds the replay tool looks for when topics are not given
KIND_TYPES: dict[str, tuple[str, ...]] = {
    "pointcloud": (POINTCLOUD2,),
    "image": (IMAGE, COMPRESSED_IMAGE),
    "camera_info": (CAMERA_INFO,),
    "tf": (TF_MESSAGE,),
}

#: ground truth carried by dataset-converted bags (see training/tools): a PointCloud2 with one
#: UINT16 ``label`` field per point of the scan with the same header stamp (65535 = ignore),
#: and a std_msgs/String holding JSON {"vocabulary": ..., "class_names": [...]}
LABELS_TOPIC = "/clip2scene/labels"
LABEL_CLASSES_TOPIC = "/clip2scene/label_classes"
LABEL_IGNORE = UNLABELED   # the same sentinel as the labelled output clouds

MCAP_MAGIC = b"\x89MCAP0\r\n"
ROS1_MAGIC = b"#ROSBAG V2.0\n"
_MAX_ERRORS_KEPT = 20


class BagError(Clip2SceneError, OSError):
    """A bag cannot be opened at all (missing, unknown format, nothing salvageable)."""


def normalize_msgtype(name: str) -> str:
    """``sensor_msgs/PointCloud2`` (ROS 1) → ``sensor_msgs/msg/PointCloud2`` (ROS 2 style)."""
    parts = name.split("/")
    if len(parts) == 2:
        return f"{parts[0]}/msg/{parts[1]}"
    return name


@dataclass
class BagMessage:
    """One deserialized message; ``log_time_ns`` is the bag's receive time."""

    topic: str
    msgtype: str
    log_time_ns: int
    msg: Any


@dataclass
class ReadReport:
    """What reading a bag delivered and what it had to skip, and why.

    Only what could not be read counts as damage: topics the caller did not ask for (a replay
    with ``--no-cameras``, extra topics in the bag) are not "missing".
    """

    path: str = ""
    storage: str = ""
    messages_read: int = 0
    #: raw message bytes were read but could not be deserialized
    corrupt_messages: int = 0
    #: mcap chunks / ROS 1 chunks / sqlite rows whose bytes could not be read at all
    unreadable_chunks: int = 0
    unreadable_rows: int = 0
    #: messages in readable chunks whose channel (topic) record was lost with a damaged chunk
    orphan_messages: int = 0
    #: the file ends inside a record (cut copy, crash while recording)
    truncated: bool = False
    #: the fallback record scanner was used (rosbags could not read the bag as a whole)
    salvaged: bool = False
    #: an mcap summary section (schemas, channels, chunk index) was found and used by salvage
    summary_used: bool = False
    #: message count the bag's own metadata announced, when known
    expected_messages: int | None = None
    #: the same per topic, when known (metadata.yaml, or the mcap summary's statistics)
    expected_by_topic: dict[str, int] | None = None
    corrupt_by_topic: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: raw messages the storage delivered per requested topic (decodable or not)
    delivered_by_topic: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: topics a caller read (``BagReader.raw_messages`` / ``messages``)
    requested_topics: set[str] = field(default_factory=set)
    #: the last read went through to the end of the bag (``missing_messages`` is final)
    complete: bool = False
    #: topics the metadata announced whose channel could not be read at all (salvage) → count
    lost_topics: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.errors) < _MAX_ERRORS_KEPT:
            self.errors.append(text)
        log.warning("%s: %s", self.path, text)

    @property
    def expected_requested(self) -> int | None:
        """Messages the metadata announced on the topics that were read."""
        if self.expected_by_topic is None:
            return None
        return sum(self.expected_by_topic.get(t, 0) for t in self.requested_topics)

    @property
    def missing_messages(self) -> int | None:
        """Messages announced on the topics read that the storage did not deliver.

        Known only after a read went to the end of the bag and when the metadata (or the mcap
        summary) announced counts; topics nobody asked for never count.
        """
        if not self.complete:
            return None
        if self.expected_by_topic is None:
            if self.expected_messages is None:
                return None
            return max(self.expected_messages - self.messages_read - self.corrupt_messages, 0)
        return sum(max(self.expected_by_topic.get(t, 0) - self.delivered_by_topic.get(t, 0), 0)
                   for t in self.requested_topics)

    @property
    def damaged(self) -> bool:
        """Anything actually unreadable (``missing_messages`` counts only after reading everything)."""
        return bool(self.corrupt_messages or self.unreadable_chunks or self.unreadable_rows
                    or self.orphan_messages or self.truncated or self.lost_topics
                    or (self.missing_messages or 0))

    def summary_line(self) -> str:
        """One line saying what was unreadable (empty for an intact bag)."""
        if not self.damaged:
            return ""
        parts = []
        if self.truncated:
            parts.append("the file is cut short (truncated)")
        if self.unreadable_chunks:
            parts.append(f"{self.unreadable_chunks} unreadable chunk(s)")
        if self.unreadable_rows:
            parts.append(f"{self.unreadable_rows} unreadable row(s)")
        if self.corrupt_messages:
            parts.append(f"{self.corrupt_messages} corrupt message(s)")
        if self.orphan_messages:
            parts.append(f"{self.orphan_messages} message(s) of unknown channels")
        if self.lost_topics:
            # the LiDAR (PointCloud2-like names) first: that is what a reader of the line wants
            names = sorted(self.lost_topics, key=lambda t: ("points" not in t, t))
            shown = ", ".join(f"{t} ({self.lost_topics[t]} messages)" for t in names[:3])
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{len(names)} topic(s) unreadable: {shown}{more}")
        if self.missing_messages:
            parts.append(f"{self.missing_messages} announced message(s) not found")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        expected_req = self.expected_requested
        return {
            "path": self.path, "storage": self.storage, "messages_read": self.messages_read,
            "corrupt_messages": self.corrupt_messages, "unreadable_chunks": self.unreadable_chunks,
            "unreadable_rows": self.unreadable_rows, "orphan_messages": self.orphan_messages,
            "truncated": self.truncated, "salvaged": self.salvaged,
            "summary_used": self.summary_used, "damaged": self.damaged, "damage": self.summary_line(),
            "expected_messages": self.expected_messages,
            "expected_messages_read_topics": expected_req,
            "messages_on_other_topics": (None if expected_req is None or self.expected_messages is None
                                         else max(self.expected_messages - expected_req, 0)),
            "missing_messages": self.missing_messages, "lost_topics": dict(self.lost_topics),
            "corrupt_by_topic": dict(self.corrupt_by_topic), "errors": list(self.errors),
        }


def load_yaml_no_aliases(text: str) -> Any:
    """``yaml.safe_load`` that refuses anchors/aliases (rosbag2 metadata never uses them; a
    small alias "bomb" would otherwise expand to gigabytes)."""
    class _Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(f"YAML aliases are not accepted here (line {event.start_mark.line + 1})")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------------------
# typestores
# --------------------------------------------------------------------------------------

def default_typestore(ros1: bool = False):
    """rosbags typestore with the real ROS message definitions (Humble for ROS 2, Noetic)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)


def _typestore_from_defs(defs: dict[str, tuple[str, str]], ros1: bool):
    """Typestore from definitions embedded in a bag ({msgtype: (encoding, text)}), on top of
    the default store so types without an embedded definition still deserialize."""
    from rosbags.typesys import get_types_from_idl, get_types_from_msg

    store = default_typestore(ros1)
    # a fresh store object: get_typestore caches, so copy before registering bag types
    from rosbags.typesys.store import Typestore

    fresh = Typestore()
    fresh.register(dict(store.fielddefs))
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
        except Exception as exc:  # a bad definition: keep the default one
            log.warning("ignoring unparsable definition of %s: %s", msgtype, exc)
    return fresh


def convert_message(msg: Any, msgtype: str, typestore) -> Any:
    """Copy ``msg`` (rclpy, ROS 1 rosbags or any duck-typed object) into ``typestore``'s class.

    Fields are matched by name, case-insensitively (ROS 1 ``K`` → ROS 2 ``k``); fields the
    source lacks keep their defaults (e.g. ROS 1 ``Header.seq`` is dropped).
    """
    from rosbags.typesys.base import Nodetype

    consts, fields = typestore.fielddefs[msgtype]
    cls = typestore.types[msgtype]
    kwargs = {}
    for name, (nodetype, detail) in fields:
        value = _get_field(msg, name)
        kwargs[name] = _convert_value(value, nodetype, detail, typestore, Nodetype)
    return cls(**kwargs)


def _get_field(msg: Any, name: str) -> Any:
    for cand in (name, name.upper(), name.lower()):
        if hasattr(msg, cand):
            return getattr(msg, cand)
    if name == "nanosec" and hasattr(msg, "nsec"):  # ROS 1 time
        return getattr(msg, "nsec")
    if name == "sec" and hasattr(msg, "secs"):
        return getattr(msg, "secs")
    if name == "nanosec" and hasattr(msg, "nsecs"):
        return getattr(msg, "nsecs")
    return _MISSING


class _Missing:
    pass


_MISSING = _Missing()

_NUMPY_TYPES = {"bool": np.bool_, "int8": np.int8, "uint8": np.uint8, "byte": np.uint8,
                "char": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
                "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64,
                "float32": np.float32, "float64": np.float64}


def _default_base(typ: str) -> Any:
    if typ == "string":
        return ""
    if typ == "bool":
        return False
    if typ.startswith("float"):
        return 0.0
    return 0


def _convert_value(value: Any, nodetype, detail, typestore, Nodetype) -> Any:
    if nodetype == Nodetype.BASE:
        typ = detail[0]
        if value is _MISSING:
            return _default_base(typ)
        if typ == "string":
            return str(value)
        if typ == "bool":
            return bool(value)
        if typ.startswith("float"):
            return float(value)
        return int(value)
    if nodetype == Nodetype.NAME:
        sub = normalize_msgtype(detail)
        if value is _MISSING:
            return convert_message(_Missing(), sub, typestore)
        return convert_message(value, sub, typestore)
    # ARRAY / SEQUENCE
    (inner_type, inner_detail), length = detail
    if inner_type == Nodetype.BASE and inner_detail[0] in _NUMPY_TYPES:
        dtype = _NUMPY_TYPES[inner_detail[0]]
        if value is _MISSING:
            return np.zeros(length if nodetype == Nodetype.ARRAY else 0, dtype=dtype)
        if isinstance(value, (bytes, bytearray, memoryview)):
            arr = np.frombuffer(bytes(value), dtype=np.uint8).astype(dtype, copy=False)
        else:
            arr = np.asarray(value, dtype=dtype)
        return np.ascontiguousarray(arr.reshape(-1))
    items = [] if value is _MISSING else list(value)
    return [_convert_value(v, inner_type, inner_detail, typestore, Nodetype) for v in items]


# --------------------------------------------------------------------------------------
# raw record sources: each yields (topic, msgtype, log_time_ns, rawdata) in time order
# --------------------------------------------------------------------------------------

@dataclass
class _Topic:
    name: str
    msgtype: str
    count: int = 0
    encoding: str = ""       # definition encoding: ros2msg / ros2idl / ros1msg
    definition: str = ""


class _SourceFailure(Exception):
    """The fast (rosbags) source failed part-way; the reader continues with a salvage scan."""


class _RosbagsSource:
    """Healthy bags: rosbags' AnyReader (indexed, fast)."""

    def __init__(self, paths: list[Path], ros1: bool) -> None:
        from rosbags.highlevel import AnyReader

        self.ros1 = ros1
        self.reader = AnyReader(paths, default_typestore=default_typestore(ros1))
        self.reader.open()
        self.typestore = self.reader.typestore
        self.topics: dict[str, _Topic] = {}
        for conn in self.reader.connections:
            t = self.topics.setdefault(conn.topic, _Topic(conn.topic, conn.msgtype))
            t.count += max(int(conn.msgcount), 0)
        self.custom_data: dict[str, str] = {}
        for r in self.reader.readers:
            meta = getattr(getattr(r, "storage", None), "metadata", None)
            custom = getattr(meta, "custom", None)
            if custom:
                self.custom_data.update({str(k): str(v) for k, v in custom.items()})
        self.message_count = int(self.reader.message_count)

    def messages(self, topics: set[str]) -> Iterator[tuple[str, str, int, bytes]]:
        conns = [c for c in self.reader.connections if c.topic in topics]
        if not conns:
            return
        try:
            for conn, t, raw in self.reader.messages(connections=conns):
                yield conn.topic, conn.msgtype, int(t), raw
        except Exception as exc:  # noqa: BLE001 - any storage error: hand over to salvage
            raise _SourceFailure(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.reader.close()


def _u16(b: bytes, o: int) -> int:
    return struct.unpack_from("<H", b, o)[0]


def _u32(b: bytes, o: int) -> int:
    return struct.unpack_from("<I", b, o)[0]


def _u64(b: bytes, o: int) -> int:
    return struct.unpack_from("<Q", b, o)[0]


def _mcap_string(b: bytes, o: int) -> tuple[str, int]:
    n = _u32(b, o)
    end = o + 4 + n
    if end > len(b):
        raise ValueError("string runs past its record")
    return b[o + 4:end].decode("utf8"), end


def _decompress(data: bytes, compression: str, size: int | None = None) -> bytes:
    if compression in ("", "none"):
        return data
    if compression == "zstd":
        try:
            from compression import zstd  # type: ignore[import-not-found]  # Python ≥ 3.14
        except ImportError:
            from backports import zstd  # type: ignore[no-redef]
        return zstd.decompress(data)
    if compression == "lz4":
        import lz4.frame  # type: ignore[import-untyped]

        return lz4.frame.decompress(data)
    if compression == "bz2":
        return bz2.decompress(data)
    raise ValueError(f"unsupported compression {compression!r}")


class _McapSalvage:
    """Sequential scan of mcap records; survives a missing footer, bad chunks and a cut file.

    First pass: decode every readable chunk once to learn schemas, channels and the
    (time, chunk, offset) of every message. Second pass (``messages``): yield in time order,
    decoding chunks again on demand through a small cache.
    """

    def __init__(self, path: Path, report: ReadReport) -> None:
        self.path = path
        self.report = report
        self.schemas: dict[int, tuple[str, str, str]] = {}
        self.channels: dict[int, tuple[str, int]] = {}   # id → (topic, schema id)
        self.chunks: list[tuple[int, int, str, int]] = []  # (data offset, length, compression, usize)
        self.index: list[tuple[int, int, int, int]] = []  # (log time, chunk no (-1 = file), offset, channel)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self.expected_by_topic: dict[str, int] | None = None
        self._scan()
        self.topics: dict[str, _Topic] = {}
        for cid, (topic, sid) in self.channels.items():
            name, enc, text = self.schemas.get(sid, ("", "", ""))
            self.topics.setdefault(topic, _Topic(topic, name, 0, enc, text))
        for _, _, _, cid in self.index:
            if cid in self.channels:
                self.topics[self.channels[cid][0]].count += 1
        defs = {t.msgtype: (t.encoding, t.definition) for t in self.topics.values()}
        self.typestore = _typestore_from_defs(defs, ros1=False)
        self.custom_data: dict[str, str] = {}

    def _records(self, buf: bytes, base: int, end: int | None = None) -> Iterator[tuple[int, int, int]]:
        """(opcode, content offset, content length) of the records in ``buf[base:end]``."""
        pos = base
        n = len(buf) if end is None else end
        while pos + 9 <= n:
            op = buf[pos]
            length = _u64(buf, pos + 1)
            start = pos + 9
            if start + length > n:
                raise EOFError(f"record 0x{op:02x} at byte {pos} needs {length} bytes, "
                               f"{n - start} left")
            yield op, start, length
            pos = start + length
        if pos != n:
            raise EOFError(f"{n - pos} stray bytes at the end")

    def _parse_meta(self, op: int, rec: bytes) -> None:
        if op == 0x03:
            sid = _u16(rec, 0)
            name, o = _mcap_string(rec, 2)
            enc, o = _mcap_string(rec, o)
            n = _u32(rec, o)
            self.schemas[sid] = (normalize_msgtype(name), enc, rec[o + 4:o + 4 + n].decode("utf8", "replace"))
        elif op == 0x04:
            cid = _u16(rec, 0)
            sid = _u16(rec, 2)
            topic, _ = _mcap_string(rec, 4)
            self.channels[cid] = (topic, sid)

    def _scan(self) -> None:
        data = self.path.read_bytes()
        if not data.startswith(MCAP_MAGIC):
            raise BagError(f"{self.path}: not an mcap file (bad magic)")
        self._partial: dict[int, bytes] = {}
        self._data = data
        chunk_offsets = self._read_summary(data)
        if chunk_offsets:
            # the summary says where every chunk starts: a chunk whose record header is
            # damaged costs that chunk only, the scan never loses its place
            for at, length in chunk_offsets:
                if at + 9 > len(data) or data[at] != 0x06 or _u64(data, at + 1) + 9 != length \
                        or at + length > len(data):
                    self.report.unreadable_chunks += 1
                    self.report.note(f"mcap chunk at byte {at} (from the summary's chunk index) "
                                     "has a damaged record header")
                    continue
                self._scan_chunk(data, at + 9, length - 9)
        else:
            self._linear_scan(data)
        self.index.sort()
        orphans = sum(1 for *_, cid in self.index if cid not in self.channels)
        if orphans:
            self.report.orphan_messages += orphans
            self.report.note(f"{orphans} message(s) belong to channels whose definition was in an "
                             "unreadable part of the file")

    def _read_summary(self, data: bytes) -> list[tuple[int, int]]:
        """Schemas, channels, per-channel message counts and the chunk index from the summary
        section at the end of the file (present when the recording was closed properly).

        Returns the (offset, record length) of every chunk the summary lists; empty without
        a usable summary (cut file, damaged footer), in which case the records are scanned
        front to back.
        """
        n = len(data)
        footer_len = 9 + 20
        if n < len(MCAP_MAGIC) * 2 + footer_len or not data.endswith(MCAP_MAGIC):
            return []
        at = n - len(MCAP_MAGIC) - footer_len
        if data[at] != 0x02 or _u64(data, at + 1) != 20:
            self.report.note("mcap footer is damaged: summary not used")
            return []
        summary_start = _u64(data, at + 9)
        if not summary_start:
            return []
        if not len(MCAP_MAGIC) <= summary_start <= at:
            self.report.note("mcap footer points outside the file: summary not used")
            return []
        chunks: list[tuple[int, int]] = []
        stats: dict[int, int] = {}
        try:
            for op, s, length in self._records(data, summary_start, at):
                rec = data[s:s + length]
                if op in (0x03, 0x04):
                    self._parse_meta(op, rec)
                elif op == 0x08:
                    chunks.append((_u64(rec, 16), _u64(rec, 24)))
                elif op == 0x0B:
                    o = 8 + 2 + 4 * 4 + 16
                    m = _u32(rec, o)
                    for k in range(o + 4, o + 4 + m, 10):
                        stats[_u16(rec, k)] = _u64(rec, k + 2)
        except (EOFError, struct.error, ValueError, UnicodeDecodeError) as exc:
            self.report.note(f"mcap summary section is damaged ({exc}): scanning the records instead")
            return []
        self.report.summary_used = True
        if stats:
            self.expected_by_topic: dict[str, int] = defaultdict(int)
            for cid, count in stats.items():
                if cid in self.channels:
                    self.expected_by_topic[self.channels[cid][0]] += count
        return sorted(chunks)

    def _linear_scan(self, data: bytes) -> None:
        pos = len(MCAP_MAGIC)
        n = len(data)
        while pos + 9 <= n:
            op, length = data[pos], _u64(data, pos + 1)
            start = pos + 9
            if start + length > n:
                self.report.truncated = True
                self.report.note(f"mcap file is cut inside record 0x{op:02x} at byte {pos} "
                                 f"({n - start} of {length} bytes)")
                if op == 0x06:
                    self._scan_cut_chunk(data, start)
                break
            if op in (0x03, 0x04):
                try:
                    self._parse_meta(op, data[start:start + length])
                except (struct.error, ValueError, UnicodeDecodeError) as exc:
                    self.report.note(f"unreadable mcap schema/channel record at byte {pos}: {exc}")
            elif op == 0x05:
                rec = data[start:start + length]
                self.index.append((_u64(rec, 6), -1, start, _u16(rec, 0)))
            elif op == 0x06:
                self._scan_chunk(data, start, length)
            elif op in (0x02, 0x0F):  # footer / data end
                break
            pos = start + length
        else:
            if pos < n:
                self.report.truncated = True
                self.report.note(f"mcap file is cut: {n - pos} stray bytes at the end")

    def _scan_cut_chunk(self, data: bytes, start: int) -> None:
        """The chunk the file ends in: decode what arrived (zstd / lz4 stream, or plain) and
        keep its complete messages; the rest of it counts as one unreadable chunk."""
        self.report.unreadable_chunks += 1
        try:
            compression, o = _mcap_string(data, start + 28)
            payload = data[o + 8:]
            if compression in ("", "none"):
                raw = payload
            elif compression == "zstd":
                try:
                    from compression import zstd  # type: ignore[import-not-found]
                except ImportError:
                    from backports import zstd  # type: ignore[no-redef]
                raw = zstd.ZstdDecompressor().decompress(payload)
            elif compression == "lz4":
                import lz4.frame  # type: ignore[import-untyped]

                raw = lz4.frame.LZ4FrameDecompressor().decompress(payload)
            else:
                return
        except Exception as exc:  # noqa: BLE001 - nothing to salvage from this chunk
            self.report.note(f"cut mcap chunk at byte {start} not decodable: {exc}")
            return
        no = len(self.chunks)
        self.chunks.append((-1, 0, "", len(raw)))
        self._partial[no] = raw
        before = len(self.index)
        pos = 0
        while pos + 9 <= len(raw):
            op, length = raw[pos], _u64(raw, pos + 1)
            s = pos + 9
            if s + length > len(raw):
                break
            if op in (0x03, 0x04):
                self._parse_meta(op, raw[s:s + length])
            elif op == 0x05:
                self.index.append((_u64(raw, s + 6), no, s, _u16(raw, s)))
            pos = s + length
        self.report.note(f"recovered {len(self.index) - before} messages from the cut chunk")

    def _scan_chunk(self, data: bytes, start: int, length: int) -> None:
        rec = data[start:start + length]
        try:
            usize = _u64(rec, 16)
            compression, o = _mcap_string(rec, 28)
            clen = _u64(rec, o)
            payload_at = start + o + 8
            raw = _decompress(data[payload_at:payload_at + clen], compression, usize)
            if len(raw) != usize:
                raise ValueError(f"chunk decompressed to {len(raw)} bytes, header says {usize}")
        except Exception as exc:  # noqa: BLE001 - corrupt chunk: skip it, keep going
            self.report.unreadable_chunks += 1
            self.report.note(f"unreadable mcap chunk at byte {start}: {exc}")
            return
        chunk_no = len(self.chunks)
        self.chunks.append((payload_at, clen, compression, usize))
        try:
            for op, s, n in self._records(raw, 0):
                if op in (0x03, 0x04):
                    self._parse_meta(op, raw[s:s + n])
                elif op == 0x05:
                    self.index.append((_u64(raw, s + 6), chunk_no, s, _u16(raw, s)))
        except (EOFError, struct.error, ValueError, UnicodeDecodeError) as exc:
            self.report.unreadable_chunks += 1
            self.report.note(f"mcap chunk at byte {start} is malformed inside: {exc}")

    def _chunk(self, no: int) -> bytes:
        if no in self._partial:
            return self._partial[no]
        if no in self._cache:
            self._cache.move_to_end(no)
            return self._cache[no]
        at, clen, comp, usize = self.chunks[no]
        raw = _decompress(self._data[at:at + clen], comp, usize)
        self._cache[no] = raw
        if len(self._cache) > 4:
            self._cache.popitem(last=False)
        return raw

    def messages(self, topics: set[str]) -> Iterator[tuple[str, str, int, bytes]]:
        for t, chunk_no, off, cid in self.index:
            if cid not in self.channels:
                continue
            topic, sid = self.channels[cid]
            if topic not in topics:
                continue
            buf = self._data if chunk_no < 0 else self._chunk(chunk_no)
            length = _u64(buf, off - 8)
            yield topic, self.topics[topic].msgtype, t, bytes(buf[off + 22:off + length])

    def close(self) -> None:
        self._cache.clear()
        self._partial.clear()
        self._data = b""


class _SqliteSalvage:
    """Row-by-row read of a rosbag2 sqlite3 file; a row on a damaged page is counted, skipped."""

    def __init__(self, path: Path, report: ReadReport) -> None:
        self.path = path
        self.report = report
        self._tmp: tempfile.TemporaryDirectory | None = None
        path = self._padded(path)
        try:
            self.db = sqlite3.connect(f"file:{path}?immutable=1&mode=ro", uri=True)
            rows = self.db.execute("SELECT id, name, type FROM topics").fetchall()
        except sqlite3.Error as exc:
            raise BagError(f"{path}: sqlite file unreadable: {exc}") from exc
        self.topic_by_id = {int(i): (name, normalize_msgtype(typ)) for i, name, typ in rows}
        defs: dict[str, tuple[str, str]] = {}
        try:
            for typ, enc, text in self.db.execute(
                    "SELECT topic_type, encoding, encoded_message_definition FROM message_definitions"):
                defs[normalize_msgtype(typ)] = (enc, text)
        except sqlite3.Error:
            pass
        self.typestore = _typestore_from_defs(defs, ros1=False)
        self.index = self._index()
        self.topics: dict[str, _Topic] = {}
        for name, typ in self.topic_by_id.values():
            self.topics.setdefault(name, _Topic(name, typ))
        for _, _, tid in self.index:
            if tid in self.topic_by_id:
                self.topics[self.topic_by_id[tid][0]].count += 1
        self.custom_data: dict[str, str] = {}

    def _padded(self, path: Path) -> Path:
        """A cut sqlite file is refused outright ("malformed"); a zero-padded copy to the
        page count its header announces opens, and only rows on the missing pages fail."""
        head = path.read_bytes()[:100] if path.stat().st_size >= 100 else b""
        if not head.startswith(b"SQLite format 3\x00"):
            raise BagError(f"{path}: not an sqlite3 file")
        page = struct.unpack(">H", head[16:18])[0]
        page = 65536 if page == 1 else page
        want = page * struct.unpack(">I", head[28:32])[0]
        size = path.stat().st_size
        if size >= want and size % page == 0:
            return path
        self.report.truncated = True
        self.report.note(f"sqlite file is cut: {size} of {want} bytes")
        self._tmp = tempfile.TemporaryDirectory(prefix="clip2scene_bag_")
        copy = Path(self._tmp.name) / path.name
        shutil.copyfile(path, copy)
        with copy.open("r+b") as fh:
            fh.truncate(max(want, (size // page + 1) * page))
        return copy

    def _index(self) -> list[tuple[int, int, int]]:
        """(timestamp, row id, topic id) of every row whose header can be read."""
        try:
            rows = self.db.execute("SELECT timestamp, id, topic_id FROM messages").fetchall()
            return sorted((int(t), int(i), int(tid)) for t, i, tid in rows)
        except sqlite3.Error as exc:
            self.report.note(f"sqlite table scan failed ({exc}); probing rows one by one")
        bound = 0
        for q in ("SELECT max(id) FROM messages", "SELECT count(*) FROM messages"):
            try:
                bound = int(self.db.execute(q).fetchone()[0] or 0)
                break
            except sqlite3.Error:
                continue
        out: list[tuple[int, int, int]] = []
        failed: list[int] = []
        misses = 0
        i = 0
        while (i < bound) if bound else (misses <= 1000):
            i += 1
            try:
                row = self.db.execute("SELECT timestamp, topic_id FROM messages WHERE id=?", (i,)).fetchone()
            except sqlite3.Error:
                failed.append(i)
                misses += 1
                continue
            if row is None:
                misses += 1
                continue
            misses = 0
            out.append((int(row[0]), i, int(row[1])))
        if not bound:  # without a bound, failures after the last good row may be past the end
            last = out[-1][1] if out else 0
            failed = [f for f in failed if f < last]
        self.report.unreadable_rows += len(failed)
        return sorted(out)

    def messages(self, topics: set[str]) -> Iterator[tuple[str, str, int, bytes]]:
        for t, rowid, tid in self.index:
            name, typ = self.topic_by_id.get(tid, ("", ""))
            if name not in topics:
                continue
            try:
                row = self.db.execute("SELECT data FROM messages WHERE id=?", (rowid,)).fetchone()
            except sqlite3.Error as exc:
                self.report.unreadable_rows += 1
                self.report.note(f"sqlite row {rowid} ({name}) unreadable: {exc}")
                continue
            if row is None:
                continue
            yield name, typ, t, bytes(row[0])

    def close(self) -> None:
        self.db.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def _ros1_header(buf: bytes, o: int, n: int) -> dict[str, bytes]:
    fields = {}
    end = o + n
    while o + 4 <= end:
        ln = _u32(buf, o)
        o += 4
        item = buf[o:o + ln]
        o += ln
        key, _, val = item.partition(b"=")
        fields[key.decode("ascii", "replace")] = val
    return fields


class _Ros1Salvage:
    """Sequential scan of ROS 1 bag records (works without the index a cut bag is missing)."""

    def __init__(self, path: Path, report: ReadReport) -> None:
        self.path = path
        self.report = report
        self.conns: dict[int, _Topic] = {}
        self.msgs: list[tuple[int, int, int, int, int]] = []  # (time, seq, chunk no, offset, conn)
        self.chunks: list[tuple[int, int, str]] = []  # (offset, size, compression)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._data = path.read_bytes()
        if not self._data.startswith(ROS1_MAGIC):
            raise BagError(f"{path}: not a ROS 1 bag (bad magic)")
        self._scan()
        self.topics: dict[str, _Topic] = {}
        for c in self.conns.values():
            self.topics.setdefault(c.name, _Topic(c.name, c.msgtype, 0, c.encoding, c.definition))
        for *_, cid in self.msgs:
            if cid in self.conns:
                self.topics[self.conns[cid].name].count += 1
        defs = {t.msgtype: ("ros1msg", t.definition) for t in self.topics.values()}
        self.typestore = _typestore_from_defs(defs, ros1=True)
        self.custom_data: dict[str, str] = {}

    def _records(self, buf: bytes, pos: int) -> Iterator[tuple[dict[str, bytes], int, int]]:
        n = len(buf)
        while pos < n:
            if pos + 4 > n:
                raise EOFError("cut inside a record header length")
            hlen = _u32(buf, pos)
            if pos + 4 + hlen + 4 > n:
                raise EOFError(f"record header at byte {pos} is cut")
            header = _ros1_header(buf, pos + 4, hlen)
            dpos = pos + 4 + hlen
            dlen = _u32(buf, dpos)
            if dpos + 4 + dlen > n:
                raise EOFError(f"record data at byte {dpos} is cut")
            yield header, dpos + 4, dlen
            pos = dpos + 4 + dlen

    def _conn(self, header: dict[str, bytes], buf: bytes, o: int, n: int) -> None:
        cid = _u32(header["conn"], 0)
        if cid in self.conns:
            return
        ch = _ros1_header(buf, o, n)
        self.conns[cid] = _Topic(header.get("topic", b"").decode(),
                                 normalize_msgtype(ch.get("type", b"").decode()), 0, "ros1msg",
                                 ch.get("message_definition", b"").decode("utf8", "replace"))

    def _scan(self) -> None:
        data = self._data
        seq = 0
        try:
            for header, o, n in self._records(data, len(ROS1_MAGIC)):
                op = header.get("op", b"\x00")[0]
                if op == 0x07:
                    self._conn(header, data, o, n)
                elif op == 0x05:
                    comp = header.get("compression", b"none").decode()
                    try:
                        raw = _decompress(data[o:o + n], comp)
                    except Exception as exc:  # noqa: BLE001
                        self.report.unreadable_chunks += 1
                        self.report.note(f"unreadable ROS 1 chunk at byte {o}: {exc}")
                        continue
                    no = len(self.chunks)
                    self.chunks.append((o, n, comp))
                    try:
                        for h2, o2, n2 in self._records(raw, 0):
                            op2 = h2.get("op", b"\x00")[0]
                            if op2 == 0x07:
                                self._conn(h2, raw, o2, n2)
                            elif op2 == 0x02:
                                t = h2["time"]
                                ns = _u32(t, 0) * 1_000_000_000 + _u32(t, 4)
                                self.msgs.append((ns, seq, no, o2, _u32(h2["conn"], 0)))
                                seq += 1
                    except (EOFError, KeyError, struct.error) as exc:
                        self.report.unreadable_chunks += 1
                        self.report.note(f"ROS 1 chunk at byte {o} is malformed inside: {exc}")
                elif op == 0x02:
                    t = header["time"]
                    ns = _u32(t, 0) * 1_000_000_000 + _u32(t, 4)
                    self.msgs.append((ns, seq, -1, o, _u32(header["conn"], 0)))
                    seq += 1
                elif op == 0x04 or op == 0x06:
                    continue
        except EOFError as exc:
            self.report.truncated = True
            self.report.unreadable_chunks += 1
            self.report.note(f"ROS 1 bag is cut: {exc}")
        self.msgs.sort()

    def _chunk(self, no: int) -> bytes:
        if no not in self._cache:
            o, n, comp = self.chunks[no]
            self._cache[no] = _decompress(self._data[o:o + n], comp)
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[no]

    def messages(self, topics: set[str]) -> Iterator[tuple[str, str, int, bytes]]:
        for t, _, no, off, cid in self.msgs:
            c = self.conns.get(cid)
            if c is None or c.name not in topics:
                continue
            buf = self._data if no < 0 else self._chunk(no)
            n = _u32(buf, off - 4)
            yield c.name, c.msgtype, t, bytes(buf[off:off + n])

    def close(self) -> None:
        self._cache.clear()
        self._data = b""


# --------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------

def _storage_files(path: Path) -> tuple[str, list[Path]]:
    """(storage kind, files) for a rosbag2 directory, an .mcap / .db3 file or a ROS 1 .bag."""
    if path.is_dir():
        files = sorted(path.glob("*.mcap")) or sorted(path.glob("*.db3"))
        if not files:
            raise BagError(f"{path}: no .mcap or .db3 file in this rosbag2 directory")
        return ("mcap" if files[0].suffix == ".mcap" else "sqlite3"), files
    if path.suffix == ".bag":
        return "ros1", [path]
    if path.suffix == ".mcap":
        return "mcap", [path]
    if path.suffix == ".db3":
        return "sqlite3", [path]
    head = path.read_bytes()[:16] if path.is_file() else b""
    if head.startswith(MCAP_MAGIC):
        return "mcap", [path]
    if head.startswith(ROS1_MAGIC):
        return "ros1", [path]
    if head.startswith(b"SQLite format 3"):
        return "sqlite3", [path]
    raise BagError(f"{path}: unknown bag format")


class BagReader:
    """Read a rosbag2 directory (mcap / sqlite3), a bare .mcap / .db3 file or a ROS 1 .bag.

    Use as a context manager. ``topics`` maps topic → message type; :meth:`messages` yields
    deserialized :class:`BagMessage` in bag time order; ``report`` says what was skipped.
    With ``salvage=False`` a damaged bag raises :class:`BagError` instead.
    """

    def __init__(self, path: str | Path, *, salvage: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f"{self.path}: no such bag")
        self.salvage = salvage
        self.storage, self.files = _storage_files(self.path)
        self.report = ReadReport(path=str(self.path), storage=self.storage)
        self._source: Any = None
        self._sources_salvage: list[Any] | None = None

    # -- opening ------------------------------------------------------------------------
    def open(self) -> "BagReader":
        self.report.expected_messages = self._metadata_count()
        ros1 = self.storage == "ros1"
        rosbags_paths = [self.path] if self._metadata_ok else self.files
        try:
            self._source = _RosbagsSource(list(rosbags_paths), ros1)
            if self.report.expected_messages is None:
                self.report.expected_messages = self._source.message_count
            if self.report.expected_by_topic is None:
                self.report.expected_by_topic = {n: t.count for n, t in self._source.topics.items()}
        except Exception as exc:  # noqa: BLE001 - rosbags refused the bag: try to salvage it
            if not self.salvage:
                raise BagError(f"{self.path}: {exc}") from exc
            self.report.note(f"rosbags cannot open the bag ({type(exc).__name__}: {exc}); "
                             "scanning its records instead")
            self._source = None
            self._open_salvage()
        return self

    _metadata_ok = False
    _METADATA_MAX_BYTES = 16 * 2**20

    def _metadata_count(self) -> int | None:
        """Message counts (total, and per topic) from metadata.yaml; None without one."""
        meta = self.path / "metadata.yaml" if self.path.is_dir() else None
        if meta is None or not meta.exists():
            return None
        try:
            if meta.stat().st_size > self._METADATA_MAX_BYTES:
                raise ValueError(f"{meta.stat().st_size} bytes")
            info = load_yaml_no_aliases(meta.read_text())["rosbag2_bagfile_information"]
            self._metadata_custom = {str(k): str(v) for k, v in (info.get("custom_data") or {}).items()}
            count = int(info["message_count"])
            per_topic: dict[str, int] = defaultdict(int)
            for entry in info.get("topics_with_message_count") or []:
                per_topic[str(entry["topic_metadata"]["name"])] += int(entry["message_count"])
            self.report.expected_by_topic = dict(per_topic)
            self._metadata_ok = True
            return count
        except Exception as exc:  # noqa: BLE001 - broken metadata is itself damage we report
            self.report.note(f"metadata.yaml is unreadable ({type(exc).__name__}: {exc}); "
                             "reading the storage files directly")
            return None

    def _open_salvage(self) -> None:
        self.report.salvaged = True
        cls: Callable[[Path, ReadReport], Any] = {
            "mcap": _McapSalvage, "sqlite3": _SqliteSalvage, "ros1": _Ros1Salvage}[self.storage]
        sources = []
        for f in self.files:
            try:
                sources.append(cls(f, self.report))
            except BagError:
                raise
            except Exception as exc:  # noqa: BLE001
                self.report.note(f"{f}: nothing readable ({type(exc).__name__}: {exc})")
        if not sources:
            raise BagError(f"{self.path}: no readable storage file")
        self._sources_salvage = sources
        if self.report.expected_by_topic is None:   # no metadata.yaml: the mcap summary's counts
            counts = [getattr(src, "expected_by_topic", None) for src in sources]
            if counts and all(c is not None for c in counts):
                merged: dict[str, int] = defaultdict(int)
                for c in counts:
                    for name, k in c.items():
                        merged[name] += k
                self.report.expected_by_topic = dict(merged)
                if self.report.expected_messages is None:
                    self.report.expected_messages = sum(merged.values())
        readable = self._topic_table()
        self.report.lost_topics = {t: n for t, n in (self.report.expected_by_topic or {}).items()
                                   if n > 0 and t not in readable}
        if self.report.lost_topics:
            self.report.note("no readable channel record for " + ", ".join(sorted(self.report.lost_topics)))

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        for s in self._sources_salvage or []:
            s.close()
        self._sources_salvage = None

    def __enter__(self) -> "BagReader":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- topics -------------------------------------------------------------------------
    def _topic_table(self) -> dict[str, _Topic]:
        if self._source is not None:
            return self._source.topics
        merged: dict[str, _Topic] = {}
        for s in self._sources_salvage or []:
            for name, t in s.topics.items():
                m = merged.setdefault(name, _Topic(name, t.msgtype))
                m.count += t.count
        return merged

    @property
    def topics(self) -> dict[str, str]:
        """topic → message type (ROS 2 style name)."""
        return {n: normalize_msgtype(t.msgtype) for n, t in self._topic_table().items()}

    @property
    def message_counts(self) -> dict[str, int]:
        return {n: t.count for n, t in self._topic_table().items()}

    @property
    def custom_data(self) -> dict[str, str]:
        out = dict(getattr(self, "_metadata_custom", {}) or {})
        if self._source is not None:
            out.update(self._source.custom_data)
        return out

    def topics_of_type(self, *msgtypes: str) -> list[str]:
        """Topics whose type is one of ``msgtypes`` (``sensor_msgs/msg/Image`` or ``Image``)."""
        want = {normalize_msgtype(m) for m in msgtypes}
        short = {m for m in msgtypes if "/" not in m}
        return sorted(n for n, t in self.topics.items()
                      if t in want or t.rsplit("/", 1)[-1] in short)

    def find_topics(self) -> dict[str, list[str]]:
        """Topics per kind (pointcloud, image, camera_info, tf) found by message type."""
        return {kind: self.topics_of_type(*types) for kind, types in KIND_TYPES.items()}

    # -- messages -----------------------------------------------------------------------
    def _deserialize(self, source: Any, topic: str, msgtype: str, raw: bytes) -> Any:
        store = source.typestore
        if getattr(source, "ros1", False) or isinstance(source, _Ros1Salvage):
            return store.deserialize_ros1(raw, msgtype)
        return store.deserialize_cdr(raw, msgtype)

    def raw_messages(self, topics: Iterable[str] | None = None
                     ) -> Iterator[tuple[str, str, int, bytes, Any]]:
        """(topic, type, log time, raw bytes, source) in time order, salvaging on failure."""
        if self._source is None and self._sources_salvage is None:
            raise BagError("BagReader is not open")
        wanted = set(self.topics) if topics is None else set(topics)
        report = self.report
        report.complete = False
        report.requested_topics |= wanted
        for name in wanted:   # a second read of a topic counts afresh
            report.delivered_by_topic[name] = 0
        last_t = -1
        at_last: set[tuple[str, bytes]] = set()
        if self._source is not None:
            try:
                for topic, typ, t, raw in self._source.messages(wanted):
                    if t != last_t:
                        last_t, at_last = t, set()
                    at_last.add((topic, raw[:64]))
                    report.delivered_by_topic[topic] += 1
                    yield topic, typ, t, raw, self._source
                report.complete = True
                return
            except _SourceFailure as exc:
                if not self.salvage:
                    raise BagError(f"{self.path}: {exc}") from exc
                self.report.note(f"reading stopped part-way ({exc}); scanning the rest")
                self._open_salvage()
        gens = [((t, topic, typ, raw, s) for topic, typ, t, raw in s.messages(wanted))
                for s in self._sources_salvage or []]
        for t, topic, typ, raw, s in heapq.merge(*gens, key=lambda x: x[0]):
            if t < last_t or (t == last_t and (topic, raw[:64]) in at_last):
                continue  # already delivered before the fast path failed
            report.delivered_by_topic[topic] += 1
            yield topic, typ, t, raw, s
        report.complete = True

    def messages(self, topics: Iterable[str] | None = None) -> Iterator[BagMessage]:
        """Deserialized messages of ``topics`` (all if None) in bag time order.

        A message whose bytes do not deserialize is counted in ``report.corrupt_messages``
        and skipped.
        """
        for topic, typ, t, raw, source in self.raw_messages(topics):
            msg = self.decode(topic, typ, t, raw, source)
            if msg is not None:
                yield msg

    def decode(self, topic: str, typ: str, t: int, raw: bytes, source: Any) -> BagMessage | None:
        """Deserialize one item of :meth:`raw_messages`; None (counted as corrupt) on failure.

        Lets a caller that copies most topics verbatim deserialize only the ones it needs.
        """
        try:
            msg = self._deserialize(source, topic, typ, raw)
        except Exception as exc:  # noqa: BLE001 - corrupt payload: count, skip
            self.report.corrupt_messages += 1
            self.report.corrupt_by_topic[topic] += 1
            self.report.note(f"corrupt {typ} on {topic} at {t}: {type(exc).__name__}: {exc}")
            return None
        self.report.messages_read += 1
        return BagMessage(topic, normalize_msgtype(typ), t, msg)

    def is_ros1(self, source: Any) -> bool:
        """Whether ``source`` (from :meth:`raw_messages`) holds ROS 1 serialized bytes."""
        return bool(getattr(source, "ros1", False) or isinstance(source, _Ros1Salvage))


# --------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------

#: custom_data key every BagWriter bag carries in metadata.yaml: ``--overwrite`` only ever
#: replaces a bag that has it (or an empty folder)
WRITER_MARK_KEY = "clip2scene.writer"
WRITER_MARK = "clip2scene_ros BagWriter"


def _own_bag_files(path: Path) -> list[Path] | str:
    """The files of a bag :class:`BagWriter` wrote at ``path`` (metadata.yaml last), or the
    reason why ``path`` is not such a bag."""
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is a file, not a bag directory"
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return []
    meta = path / "metadata.yaml"
    if "metadata.yaml" not in entries or meta.is_symlink() or not meta.is_file():
        return f"it is not a rosbag2 directory (no metadata.yaml; it holds {_some(entries)})"
    try:
        if meta.stat().st_size > BagReader._METADATA_MAX_BYTES:
            raise ValueError("too large")
        info = load_yaml_no_aliases(meta.read_text())["rosbag2_bagfile_information"]
        custom = info.get("custom_data") or {}
        files = [str(f) for f in info.get("relative_file_paths") or []]
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata: not provably ours
        return f"its metadata.yaml is unreadable ({type(exc).__name__})"
    if not isinstance(custom, dict) or custom.get(WRITER_MARK_KEY) != WRITER_MARK:
        return ("it is a rosbag2 bag this tool did not write (no "
                f"'{WRITER_MARK_KEY}' mark in metadata.yaml: recorded by another tool or an older version)")
    if any(Path(f).name != f or f in (".", "..", "metadata.yaml") for f in files):
        return "its metadata.yaml lists files outside the bag directory"
    extra = [e for e in entries if e != "metadata.yaml" and e not in files]
    if extra:
        return f"it holds files that are not part of the bag: {_some(extra)}"
    out = []
    for f in files:
        fp = path / f
        if fp.is_symlink() or (fp.exists() and not fp.is_file()):
            return f"its storage file {f} is not a regular file"
        if fp.exists():
            out.append(fp)
    return out + [meta]


def _some(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def check_output_bag(path: str | Path, overwrite: bool = False, what: str = "--out") -> None:
    """Raise :class:`BagError` unless a bag may be written at ``path``.

    Nothing is deleted here (see :func:`prepare_output_bag`): tools call this before doing
    any work, so a refused path costs nothing. ``path`` may be missing (its parent must be a
    directory or creatable), an empty directory, or — with ``overwrite`` — a bag this
    package's :class:`BagWriter` wrote: its metadata.yaml carries the writer's mark and the
    directory holds only the storage files metadata.yaml lists.
    """
    path = Path(path)
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise BagError(f"{what} {path}: cannot create it, {parent} is a file, not a directory")
            break
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if not overwrite:
        kind = "a file" if path.is_file() else "a folder"
        raise BagError(f"{what} {path} exists already ({kind}); pass --overwrite to replace a bag "
                       "this tool wrote, or choose another path")
    own = _own_bag_files(path)
    if isinstance(own, str):
        raise BagError(f"{what} {path}: refusing to replace it with --overwrite: {own}. "
                       "Only a bag this tool wrote or an empty folder is replaced; move it away "
                       "or choose another path")


def prepare_output_bag(path: str | Path, overwrite: bool = False, what: str = "--out") -> None:
    """:func:`check_output_bag`, then remove the empty folder or the tool's own old bag (file by
    file, then the folder: never a recursive delete)."""
    path = Path(path)
    check_output_bag(path, overwrite, what)
    if not path.is_dir():
        return
    own = _own_bag_files(path)
    if isinstance(own, str):   # changed since the check: refuse
        raise BagError(f"{what} {path}: refusing to replace it: {own}")
    try:
        for f in own:
            f.unlink()
        path.rmdir()
    except OSError as exc:
        raise BagError(f"{what} {path}: cannot remove the old bag: {exc.strerror or exc}") from exc


def os_error_text(exc: OSError) -> str:
    """``disk full`` etc. in words, for one-line CLI errors."""
    if exc.errno == errno.ENOSPC:
        return "no space left on the device (disk full)"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


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
        except Exception as exc:  # noqa: BLE001 - rosbags' WriterError (exists, ...)
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
        except Exception as exc:  # noqa: BLE001 - disk full, I/O error: say so, keep the data
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

