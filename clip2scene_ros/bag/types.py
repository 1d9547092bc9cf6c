"""Names every part of the bag package shares: message types, topics, errors, the read report.

Leaf of the package (no storage code), so the reader, the three salvagers and the writer
all import from here and never from each other's modules.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import yaml

from clip2scene_core.errors import Clip2SceneError


log = logging.getLogger("clip2scene_ros.bag")

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
#: UINT16 ``label`` field per point of the scan with the same header stamp (65535 = `label_spaces.UNLABELED`),
#: and a std_msgs/String holding JSON {"vocabulary": ..., "class_names": [...]}
LABELS_TOPIC = "/clip2scene/labels"
LABEL_CLASSES_TOPIC = "/clip2scene/label_classes"

MCAP_MAGIC = b"\x89MCAP0\r\n"
ROS1_MAGIC = b"#ROSBAG V2.0\n"
SQLITE_MAGIC = b"SQLite format 3\x00"
#: metadata.yaml larger than this is refused unread (rosbag2 writes a few kB)
METADATA_MAX_BYTES = 16 * 2**20
_MAX_ERRORS_KEPT = 20


class BagError(Clip2SceneError, OSError):
    """A bag cannot be opened at all (missing, unknown format, nothing salvageable)."""


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


@dataclass
class TopicInfo:
    """One topic of a storage file: its type, message count and embedded definition."""

    name: str
    msgtype: str
    count: int = 0
    encoding: str = ""       # definition encoding: ros2msg / ros2idl / ros1msg
    definition: str = ""


class SourceFailure(Exception):
    """The fast (rosbags) source failed part-way; the reader continues with a salvage scan."""


def load_yaml_no_aliases(text: str) -> Any:
    """``yaml.safe_load`` that refuses anchors/aliases (rosbag2 metadata never uses them; a
    small alias "bomb" would otherwise expand to gigabytes)."""
    class _Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(f"YAML aliases are not accepted here (line {event.start_mark.line + 1})")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=_Loader)


def some(names: list[str], k: int = 5) -> str:
    """The first ``k`` names, and how many more, for one-line messages."""
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")
