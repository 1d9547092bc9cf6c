"""Reading rosbag2 (mcap, sqlite3) and ROS 1 bags: :class:`BagReader`.

Why not just ``rosbags.highlevel.AnyReader``: recordings end badly (a robot loses power, a
disk fills, a file is cut when copied). rosbags refuses an mcap without its footer, a ROS 1
bag without its index, and stops at the first unreadable sqlite page or chunk. Replay should
instead evaluate every frame that survived and say how much was lost, so the reader uses
rosbags for healthy bags and falls back to one salvage scanner per storage format
(``mcap_salvage``, ``sqlite_salvage``, ``ros1_salvage``) for damaged ones, counting what it
skipped in :class:`ReadReport`.

Messages come back deserialized as rosbags message objects (ROS 2 field names for rosbag2,
ROS 1 names such as ``K`` / ``D`` for ROS 1 bags; the converters in this package accept both).
A salvage source is any object with ``topics`` ({name: TopicInfo}), ``typestore``,
``custom_data``, ``messages(topics)`` → (topic, type, log time ns, raw bytes) in time order,
``close()``, and ``ros1`` when its bytes are ROS 1 serialized.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..typestore import default_typestore, normalize_msgtype
from .mcap_salvage import McapSalvage
from .ros1_salvage import Ros1Salvage
from .sqlite_salvage import SqliteSalvage
from .types import (KIND_TYPES, MCAP_MAGIC, METADATA_MAX_BYTES, ROS1_MAGIC, SQLITE_MAGIC, BagError,
                    BagMessage, ReadReport, SourceFailure, TopicInfo, load_yaml_no_aliases)


class _RosbagsSource:
    """Healthy bags: rosbags' AnyReader (indexed, fast)."""

    def __init__(self, paths: list[Path], ros1: bool) -> None:
        from rosbags.highlevel import AnyReader

        self.ros1 = ros1
        self.reader = AnyReader(paths, default_typestore=default_typestore(ros1))
        self.reader.open()
        self.typestore = self.reader.typestore
        self.topics: dict[str, TopicInfo] = {}
        for conn in self.reader.connections:
            t = self.topics.setdefault(conn.topic, TopicInfo(conn.topic, conn.msgtype))
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
        except Exception as exc:
            raise SourceFailure(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.reader.close()


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
    head = b""
    if path.is_file():
        with path.open("rb") as fh:
            head = fh.read(16)
    if head.startswith(MCAP_MAGIC):
        return "mcap", [path]
    if head.startswith(ROS1_MAGIC):
        return "ros1", [path]
    if head.startswith(SQLITE_MAGIC):
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
        except Exception as exc:
            if not self.salvage:
                raise BagError(f"{self.path}: {exc}") from exc
            self.report.note(f"rosbags cannot open the bag ({type(exc).__name__}: {exc}); "
                             "scanning its records instead")
            self._source = None
            self._open_salvage()
        return self

    _metadata_ok = False

    def _metadata_count(self) -> int | None:
        """Message counts (total, and per topic) from metadata.yaml; None without one."""
        meta = self.path / "metadata.yaml" if self.path.is_dir() else None
        if meta is None or not meta.exists():
            return None
        try:
            if meta.stat().st_size > METADATA_MAX_BYTES:
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
            "mcap": McapSalvage, "sqlite3": SqliteSalvage, "ros1": Ros1Salvage}[self.storage]
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
    def _topic_table(self) -> dict[str, TopicInfo]:
        if self._source is not None:
            return self._source.topics
        merged: dict[str, TopicInfo] = {}
        for s in self._sources_salvage or []:
            for name, t in s.topics.items():
                m = merged.setdefault(name, TopicInfo(name, t.msgtype))
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
        if self.is_ros1(source):
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
            except SourceFailure as exc:
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
        return bool(getattr(source, "ros1", False))
