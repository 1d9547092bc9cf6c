"""A bag as the node sees it: synchronised LiDAR sweeps with their cameras, TF and ground truth.

`FrameSource` reads a rosbag2 (mcap / sqlite3) or ROS 1 bag in bag-time order through what the
node runs: each image paired with its camera's CameraInfo, `FrameSync` (approximate time,
sweep-driven, bag log time as the clock), and a `TransformBuffer` filled from the bag's
/tf_static and /tf behind the node's TF policy `TfResolver` (parameter ``fixed_frame``). It
yields one `Frame` the moment the sync releases it, so the TF buffer then holds exactly the
transforms read up to that point, as in the node: use a frame (its TF lookups) before asking
for the next one.

Ground truth (the dataset converters' /clip2scene/labels clouds and /clip2scene/label_classes,
written just before their sweep) goes to a `GroundTruthSink` in bag order — the replay tool's
evaluator, or by default a `GroundTruthStore` — and a frame carries the labels of its stamp
when they were read before it. Nothing is left out silently: `FrameCounters` counts sweeps,
drops and camera skips per reason. Used by the replay tool (`clip2scene_ros.replay_run`) and
training's rosbag reader (`training.engine.rosbag_source`). No rclpy, no torch.
"""
from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from clip2scene_core.errors import Clip2SceneError, ConfigError
from clip2scene_core.label_spaces import UNLABELED

from .bag import BagError, BagReader
from .evaluation import parse_label_classes
from .msgs import header_stamp_ns
from .node_config import NodeConfig
from .pipeline import CameraInput
from .pointcloud2 import read_points
from .sync import FrameSync, SyncedFrame
from .tf import TfResolver, TransformBuffer
from .topics import InputTopics, discover_topics

log = logging.getLogger("clip2scene.frames")

#: called with every message read, before it is used: (topic, msgtype, log time ns, raw, source)
MessageTap = Callable[[str, str, int, bytes, Any], None]


@dataclass
class FrameSourceOptions:
    """What to read from a bag, and how (the replay tool's options map onto these)."""

    bag: Path
    config: NodeConfig = field(default_factory=NodeConfig)  # topics, cameras, sync, fixed_frame
    lidar_topic: str | None = None   # default: the params' lidar_topic if in the bag, else the only one
    use_cameras: bool = True
    gt_topic: str | None = None      # default: /clip2scene/labels when the bag has it
    read_gt: bool = True             # False: the ground-truth label clouds are not read
    all_topics: bool = False         # every topic reaches the MessageTap (replay --copy-inputs)
    max_frames: int | None = None    # sweeps after this many are counted and left out
    tf_tolerance_s: float = 0.05     # s a TF lookup may lie outside the buffered range
    salvage: bool = True             # read a damaged bag as far as it goes (False: BagError)

    def __post_init__(self) -> None:
        tol = self.tf_tolerance_s
        if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise ConfigError(f"tf tolerance must be a finite number of seconds >= 0, got {tol!r}")


@dataclass
class Frame:
    """One synchronised sweep: its PointCloud2, matched cameras, TF and ground truth."""

    index: int                     # position among the frames the source yielded
    synced: SyncedFrame            # lidar, cameras {name: CameraInput}, skipped {name: reason}
    tf: TfResolver                 # LiDAR → camera lookups over the bag's TF read so far
    gt: np.ndarray | None = None   # (N,) int64 labels of this stamp (-1 ignore) read before it

    @property
    def stamp_ns(self) -> int:
        return self.synced.stamp_ns

    @property
    def lidar(self) -> Any:
        """The sweep's sensor_msgs/PointCloud2."""
        return self.synced.lidar

    @property
    def cameras(self) -> dict[str, CameraInput]:
        """Camera name → image + CameraInfo matched to the sweep (none for a skipped camera)."""
        return self.synced.cameras

    @property
    def skipped(self) -> dict[str, str]:
        """Camera name → why the sync left it out of this sweep."""
        return self.synced.skipped

    @property
    def received_ns(self) -> int:
        """The sweep's bag log time."""
        return self.synced.received_ns


@dataclass
class FrameCounters:
    """What the source read and left out, and why (the replay report's frames / dropped)."""

    lidar_messages: int = 0   # sweeps read: also corrupt ones and those beyond max_frames
    frames: int = 0           # frames yielded
    dropped: Counter[str] = field(default_factory=Counter)   # reason → sweeps / transforms
    camera_skips: defaultdict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))         # camera → reason → images


class GroundTruthSink(Protocol):
    """Where a bag's ground truth goes, in bag order (the replay's evaluator, a store)."""

    def add_gt(self, stamp: int, labels: np.ndarray) -> None: ...

    def skip(self, reason: str, example: str = "") -> None: ...

    def set_class_text(self, text: Any, where: str) -> None:
        """A /clip2scene/label_classes JSON text (None: it did not deserialize)."""

    def gt_for(self, stamp: int) -> np.ndarray | None: ...


class GroundTruthStore:
    """The default sink: labels by stamp, the first readable class list, skips per reason."""

    def __init__(self) -> None:
        self.labels: dict[int, np.ndarray] = {}
        self.class_names: list[str] | None = None
        self.skipped: Counter[str] = Counter()

    def add_gt(self, stamp: int, labels: np.ndarray) -> None:
        self.labels[stamp] = labels

    def skip(self, reason: str, example: str = "") -> None:
        self.skipped[reason] += 1
        log.warning("ground truth skipped: %s%s", reason, f" ({example})" if example else "")

    def set_class_text(self, text: Any, where: str) -> None:
        try:
            names = parse_label_classes(text)
        except ValueError as exc:
            self.skip("unreadable ground-truth class list", f"{where}: {exc}")
            return
        if self.class_names is None:
            self.class_names = names

    def gt_for(self, stamp: int) -> np.ndarray | None:
        return self.labels.get(stamp)


def labels_from_cloud(msg: Any) -> np.ndarray:
    """Ground truth of a /clip2scene/labels cloud: int64 labels, 65535 → -1 (ignore)."""
    arr = read_points(msg, ["label"])["label"].reshape(-1).astype(np.int64)
    arr[arr == UNLABELED] = -1
    return arr


class _InfoPairing:
    """Image ↔ CameraInfo in a bag: each image takes its camera's latest CameraInfo. An image
    read before the camera's first CameraInfo waits for it (a recorder writes both at one log
    time, in either order); a second such image replaces it and is counted. (The node's
    `CameraInfoPairing` "latest" policy would drop the first image instead.)"""

    def __init__(self, skips: defaultdict[str, Counter[str]]) -> None:
        self.skips = skips
        self.latest: dict[str, Any] = {}
        self.waiting: dict[str, Any] = {}

    def on_info(self, name: str, info: Any) -> Any | None:
        """The waiting image this CameraInfo releases, if any."""
        self.latest[name] = info
        return self.waiting.pop(name, None)

    def on_image(self, name: str, image: Any) -> Any | None:
        """The CameraInfo to pair ``image`` with; None: it waits for the first one."""
        if name not in self.latest:
            if name in self.waiting:
                self.skips[name]["no CameraInfo before the image"] += 1
            self.waiting[name] = image
            return None
        return self.latest[name]


class FrameSource:
    """Synchronised frames of one bag (see the module docstring); a single pass.

    ``open()`` opens the bag and picks the topics (`ConfigError` when no LiDAR topic can be
    told, `BagError` when a damaged bag has none readable); ``frames()`` (or iterating) reads
    it. ``reader`` and ``topics`` are set as soon as they are known, also when a later step
    fails, so a caller can report what was read.
    """

    def __init__(self, opts: FrameSourceOptions, ground_truth: GroundTruthSink | None = None) -> None:
        self.opts = opts
        self.tf = TransformBuffer(cache_duration_ns=60 * 1_000_000_000,
                                  tolerance_ns=int(opts.tf_tolerance_s * 1e9))
        # the node's policy and parameter (clip2scene_ros.tf.TfResolver), over the bag's TF
        self.tf_lookup = TfResolver(self.tf, opts.config.fixed_frame)
        self.ground_truth: GroundTruthSink = ground_truth if ground_truth is not None \
            else GroundTruthStore()
        self.counters = FrameCounters()
        self.reader: BagReader | None = None
        self.topics: InputTopics | None = None
        self.needed: set[str] = set()      # topics decoded and used
        self.read: set[str] = set()        # topics read: needed, or every one (all_topics)

    def __enter__(self) -> FrameSource:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    def open(self) -> FrameSource:
        opts = self.opts
        reader = self.reader = BagReader(opts.bag, salvage=opts.salvage).open()
        try:
            topics = discover_topics(reader.topics, opts.config, lidar_topic=opts.lidar_topic,
                                     use_cameras=opts.use_cameras, gt_topic=opts.gt_topic)
        except ConfigError as exc:
            if not reader.report.damaged:
                raise
            counts = reader.message_counts
            found = ", ".join(f"{t} ({counts.get(t, 0)})" for t in sorted(reader.topics)[:8]) or "none"
            if len(reader.topics) > 8:
                found += f" and {len(reader.topics) - 8} more"
            raise BagError(f"{opts.bag}: the bag is damaged ({reader.report.summary_line()}) and no "
                           f"usable LiDAR topic could be read from it; readable topics: {found}") from exc
        self.topics = topics
        if not opts.read_gt:
            topics.gt = None
        classes_json = reader.custom_data.get("clip2scene.label_classes")
        if classes_json is not None:
            self.ground_truth.set_class_text(classes_json, "metadata.yaml custom_data")
        self.needed = {topics.lidar, *(c.image_topic for c in topics.cameras),
                       *(c.info_topic for c in topics.cameras), *topics.tf, *topics.tf_static}
        if topics.gt:
            self.needed.add(topics.gt)
        if topics.gt_classes:
            self.needed.add(topics.gt_classes)
        self.read = set(reader.topics) if opts.all_topics else self.needed
        return self

    @property
    def total_messages(self) -> int:
        """Messages ``frames()`` will read (for a progress bar)."""
        counts = self.reader.message_counts if self.reader is not None else {}
        return sum(n for t, n in counts.items() if t in self.read)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def add_tf(self, msg: Any, static: bool) -> None:
        """A TFMessage's transforms into the buffer; a bad one is counted and left out."""
        for tr in getattr(msg, "transforms", []):
            try:
                self.tf.add(tr, static=static)
            except Clip2SceneError as exc:
                self.counters.dropped[f"bad transform ignored ({type(exc).__name__})"] += 1

    def frames(self, on_message: MessageTap | None = None) -> Iterator[Frame]:
        """Read the bag; yields each frame as the sync releases it. ``on_message`` sees every
        message read (``read``), before it is used."""
        if self.reader is None:
            self.open()
        reader, topics, counters = self.reader, self.topics, self.counters
        assert reader is not None and topics is not None
        cams = {c.image_topic: c for c in topics.cameras}
        infos = {c.info_topic: c for c in topics.cameras}
        sync = FrameSync([c.name for c in topics.cameras], self.opts.config.sync)
        pairing = _InfoPairing(counters.camera_skips)
        max_frames = self.opts.max_frames
        last_t = 0
        try:
            for topic, typ, t, raw, source in reader.raw_messages(self.read):
                last_t = t
                if on_message is not None:
                    on_message(topic, typ, t, raw, source)
                if topic not in self.needed:
                    continue
                m = reader.decode(topic, typ, t, raw, source)
                if m is None:
                    if topic == topics.lidar:
                        counters.lidar_messages += 1
                        counters.dropped["corrupt LiDAR message"] += 1
                    elif topic == topics.gt:
                        self.ground_truth.skip("ground-truth message does not deserialize", f"bag time {t}")
                    elif topic == topics.gt_classes:
                        self.ground_truth.set_class_text(None, f"{topic} at bag time {t}")
                    continue
                msg = m.msg
                if topic in topics.tf_static or topic in topics.tf:
                    self.add_tf(msg, static=topic in topics.tf_static)
                elif topic == topics.gt:
                    self._add_gt_cloud(msg, t)
                elif topic == topics.gt_classes:
                    self.ground_truth.set_class_text(getattr(msg, "data", None), f"{topic} at bag time {t}")
                elif topic in infos:
                    cam = infos[topic]
                    image = pairing.on_info(cam.name, msg)
                    if image is not None:   # its image came first
                        yield from self._frames(sync.add_camera(
                            cam.name, CameraInput(cam.name, image, msg, cam.optical_frame),
                            header_stamp_ns(image), t))
                elif topic in cams:
                    cam = cams[topic]
                    info = pairing.on_image(cam.name, msg)
                    if info is not None:
                        yield from self._frames(sync.add_camera(
                            cam.name, CameraInput(cam.name, msg, info, cam.optical_frame),
                            header_stamp_ns(msg), t))
                elif topic == topics.lidar:
                    counters.lidar_messages += 1
                    if max_frames is not None and counters.lidar_messages > max_frames:
                        counters.dropped["beyond --max-frames"] += 1
                        continue
                    yield from self._frames(sync.add_lidar(msg, header_stamp_ns(msg), t))
            # the bag is over: every camera is as complete as it will get
            horizon = last_t + 2 * self.opts.config.sync.camera_timeout_ns + 1
            yield from self._frames(sync.poll(horizon))
        finally:
            counters.dropped["LiDAR queue overflow while waiting for cameras"] += sync.counters.lidar_overflow

    def _frames(self, synced: list[SyncedFrame]) -> Iterator[Frame]:
        for s in synced:
            frame = Frame(self.counters.frames, s, self.tf_lookup, self.ground_truth.gt_for(s.stamp_ns))
            self.counters.frames += 1
            yield frame

    def _add_gt_cloud(self, msg: Any, t: int) -> None:
        try:
            stamp = header_stamp_ns(msg)
            labels = labels_from_cloud(msg)
        except (Clip2SceneError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            self.ground_truth.skip("unreadable ground-truth cloud",
                                   f"bag time {t}: {type(exc).__name__}: {str(exc)[:160]}")
            return
        self.ground_truth.add_gt(stamp, labels)
