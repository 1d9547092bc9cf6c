"""Pairing LiDAR sweeps with camera images, and the newest-frame hand-off to inference.

Both the rclpy node and the offline replay tool feed messages into the same `FrameSync`, so
a bag replays through exactly the matching policy the robot runs. Everything here is pure
Python (no rclpy, no numpy): times are integer nanoseconds supplied by the caller (the node's
clock, or the bag's log time), which keeps the policy deterministic and testable.

Policy (approximate time, LiDAR-driven):
- each stream keeps a bounded queue (`queue_size`); overflow drops the oldest and is counted;
- a LiDAR sweep at stamp t takes, per camera, the message whose stamp is closest to t within
  `slop`; it waits until every camera has either produced a message later than t + slop (so
  the best match is known) or gone quiet for `camera_timeout` (then that camera is skipped
  with a reason and the sweep goes out LiDAR-only for it);
- with no cameras configured a sweep is emitted at once.

`LatestSlot` is the size-1 queue between the callbacks and the inference thread: a new frame
replaces an unconsumed one (counted as a drop), so a slow model never builds up latency.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, Iterable, TypeVar

from clip2scene_core.errors import ConfigError

T = TypeVar("T")

NS_PER_S = 1_000_000_000

# reasons a camera is left out of a synchronised frame
SKIP_NO_MATCH = "no image within slop"
SKIP_TIMEOUT = "camera timed out"
SKIP_NEVER = "no image received yet"


@dataclass(frozen=True)
class SyncConfig:
    """Matching parameters (seconds in the config, nanoseconds inside)."""

    queue_size: int = 10
    slop: float = 0.05
    camera_timeout: float = 1.0

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ConfigError(f"queue_size must be >= 1, got {self.queue_size}")
        if not self.slop >= 0.0:
            raise ConfigError(f"slop must be >= 0 s, got {self.slop}")
        if not self.camera_timeout > 0.0:
            raise ConfigError(f"camera_timeout must be > 0 s, got {self.camera_timeout}")

    @property
    def slop_ns(self) -> int:
        return int(round(self.slop * NS_PER_S))

    @property
    def camera_timeout_ns(self) -> int:
        return int(round(self.camera_timeout * NS_PER_S))


@dataclass
class Stamped(Generic[T]):
    """A message with its header stamp and the time it reached us."""

    stamp_ns: int
    item: T
    received_ns: int


@dataclass
class SyncedFrame:
    """One LiDAR sweep with the camera messages matched to it.

    `cameras` maps camera name → the item given to `add_camera` (the node passes an
    (image, camera_info) pair); `skipped` maps camera name → why it is missing.
    """

    stamp_ns: int
    lidar: Any
    cameras: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    received_ns: int = 0


@dataclass
class SyncCounters:
    """Drops inside the synchroniser (the inference slot counts its own)."""

    lidar_in: int = 0
    camera_in: int = 0
    lidar_overflow: int = 0      # sweeps pushed out of a full LiDAR queue while waiting
    camera_overflow: int = 0     # camera messages pushed out before any sweep used them
    emitted: int = 0
    unknown_camera: int = 0


class FrameSync:
    """Approximate-time matcher: one LiDAR stream, N named camera streams."""

    def __init__(self, camera_names: Iterable[str] = (), config: SyncConfig | None = None) -> None:
        self.config = config or SyncConfig()
        self.camera_names: tuple[str, ...] = tuple(camera_names)
        if len(set(self.camera_names)) != len(self.camera_names):
            raise ConfigError(f"duplicate camera names: {list(self.camera_names)}")
        n = self.config.queue_size
        self._lidar: deque[Stamped[Any]] = deque()
        self._cams: dict[str, deque[Stamped[Any]]] = {c: deque() for c in self.camera_names}
        self._last_rx: dict[str, int | None] = {c: None for c in self.camera_names}
        self._used: dict[str, set[int]] = {c: set() for c in self.camera_names}
        self._maxlen = n
        self._start_ns: int | None = None   # first arrival: a camera silent since then is dead
        self.counters = SyncCounters()
        self._lock = threading.Lock()

    # -- input ---------------------------------------------------------------------------
    def add_lidar(self, item: Any, stamp_ns: int, now_ns: int | None = None) -> list[SyncedFrame]:
        """Queue a sweep; returns the frames that became complete (oldest first)."""
        now = stamp_ns if now_ns is None else now_ns
        with self._lock:
            self.counters.lidar_in += 1
            self._started(now)
            self._lidar.append(Stamped(int(stamp_ns), item, int(now)))
            while len(self._lidar) > self._maxlen:
                self._lidar.popleft()
                self.counters.lidar_overflow += 1
            return self._poll(now)

    def add_camera(self, name: str, item: Any, stamp_ns: int,
                   now_ns: int | None = None) -> list[SyncedFrame]:
        """Queue one camera message (or an image + camera-info pair) for camera `name`."""
        now = stamp_ns if now_ns is None else now_ns
        with self._lock:
            if name not in self._cams:
                self.counters.unknown_camera += 1
                return []
            self.counters.camera_in += 1
            self._started(now)
            q = self._cams[name]
            q.append(Stamped(int(stamp_ns), item, int(now)))
            self._last_rx[name] = int(now)
            while len(q) > self._maxlen:
                old = q.popleft()
                if id(old) not in self._used[name]:
                    self.counters.camera_overflow += 1
                self._used[name].discard(id(old))
            return self._poll(now)

    def poll(self, now_ns: int) -> list[SyncedFrame]:
        """Emit sweeps whose cameras have timed out; call this periodically (e.g. a timer)."""
        with self._lock:
            return self._poll(int(now_ns))

    @property
    def pending(self) -> int:
        """Sweeps waiting for camera images."""
        return len(self._lidar)

    def _started(self, now: int) -> None:
        if self._start_ns is None:
            self._start_ns = int(now)

    # -- matching ------------------------------------------------------------------------
    def _poll(self, now: int) -> list[SyncedFrame]:
        out: list[SyncedFrame] = []
        while self._lidar:
            frame = self._try_complete(self._lidar[0], now)
            if frame is None:
                break
            self._lidar.popleft()
            self.counters.emitted += 1
            out.append(frame)
        return out

    def _try_complete(self, sweep: Stamped[Any], now: int) -> SyncedFrame | None:
        slop = self.config.slop_ns
        timeout = self.config.camera_timeout_ns
        t = sweep.stamp_ns
        frame = SyncedFrame(stamp_ns=t, lidar=sweep.item, received_ns=sweep.received_ns)
        for name in self.camera_names:
            q = self._cams[name]
            best: Stamped[Any] | None = None
            for m in q:
                if abs(m.stamp_ns - t) <= slop and (best is None or
                                                    abs(m.stamp_ns - t) < abs(best.stamp_ns - t)):
                    best = m
            window_closed = any(m.stamp_ns > t + slop for m in q)
            last_rx = self._last_rx[name]
            since = self._start_ns if last_rx is None else last_rx
            camera_quiet = since is not None and now - since > timeout
            sweep_stale = now - sweep.received_ns > timeout
            if best is not None and (window_closed or camera_quiet or sweep_stale
                                     or best.stamp_ns == t):
                frame.cameras[name] = best.item
                self._used[name].add(id(best))
            elif window_closed:
                frame.skipped[name] = SKIP_NO_MATCH
            elif camera_quiet or sweep_stale:
                frame.skipped[name] = SKIP_NEVER if last_rx is None else SKIP_TIMEOUT
            else:
                return None  # the matching image may still come
        # images older than this sweep's window cannot match any later sweep
        for name in self.camera_names:
            q = self._cams[name]
            while q and q[0].stamp_ns < t - slop:
                self._used[name].discard(id(q.popleft()))
        return frame


class LatestSlot(Generic[T]):
    """A size-1 mailbox: `put` replaces what the consumer has not taken yet (a counted drop)."""

    def __init__(self) -> None:
        self._item: T | None = None
        self._full = False
        self._closed = False
        self._cond = threading.Condition()
        self.dropped = 0
        self.put_count = 0

    def put(self, item: T) -> bool:
        """Store `item`; returns True when it replaced an unconsumed one."""
        with self._cond:
            replaced = self._full
            if replaced:
                self.dropped += 1
            self._item, self._full = item, True
            self.put_count += 1
            self._cond.notify()
            return replaced

    def take(self, timeout: float | None = None) -> T | None:
        """Wait up to `timeout` seconds for an item; None on timeout or after `close`."""
        with self._cond:
            if not self._full and not self._closed:
                self._cond.wait(timeout)
            if not self._full:
                return None
            item, self._item, self._full = self._item, None, False
            return item

    def close(self) -> None:
        """Wake the consumer for shutdown; later `take` calls return what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        """Accept frames again after `close` (a managed node that is re-activated)."""
        with self._cond:
            self._closed = False
            self._item, self._full = None, False

    @property
    def closed(self) -> bool:
        return self._closed


# -- image ↔ CameraInfo ------------------------------------------------------------------------
PAIR_LATEST = "latest"
PAIR_SYNCHRONIZED = "synchronized"


@dataclass
class PairingCounters:
    images: int = 0
    infos: int = 0
    paired: int = 0
    no_info: int = 0        # images dropped: no CameraInfo received yet (latest)
    unmatched: int = 0      # images dropped: no CameraInfo within slop (synchronized)


class CameraInfoPairing:
    """Gives each image of one camera its CameraInfo, before the sweep matching.

    ``latest`` (the node's default): the newest CameraInfo received is cached and attached to
    every image, so a latched (transient-local) or low-rate CameraInfo keeps the camera alive;
    intrinsics rarely change. ``synchronized``: an image is paired with the CameraInfo whose
    stamp is closest within ``slop`` (the same approximate-time policy as `FrameSync`, for
    rigs whose CameraInfo changes per frame, e.g. zoom lenses); this is the project's own
    stand-in for message_filters' ApproximateTimeSynchronizer where that is not installed.
    Methods return the (image, info) pairs that became ready.
    """

    def __init__(self, policy: str = PAIR_LATEST, config: SyncConfig | None = None) -> None:
        if policy not in (PAIR_LATEST, PAIR_SYNCHRONIZED):
            raise ConfigError(f"camera_info_policy: '{policy}' is not one of "
                              f"{[PAIR_LATEST, PAIR_SYNCHRONIZED]}")
        self.policy = policy
        self.counters = PairingCounters()
        self._latest: Any = None
        self._sync = FrameSync(("info",), config) if policy == PAIR_SYNCHRONIZED else None
        self._lock = threading.Lock()

    @property
    def latest_info(self) -> Any:
        return self._latest

    def on_info(self, info: Any, stamp_ns: int, now_ns: int) -> list[tuple[Any, Any]]:
        with self._lock:
            self.counters.infos += 1
            self._latest = info
            if self._sync is None:
                return []
            return self._pairs(self._sync.add_camera("info", info, stamp_ns, now_ns))

    def on_image(self, image: Any, stamp_ns: int, now_ns: int) -> list[tuple[Any, Any]]:
        with self._lock:
            self.counters.images += 1
            if self._sync is not None:
                return self._pairs(self._sync.add_lidar(image, stamp_ns, now_ns))
            if self._latest is None:
                self.counters.no_info += 1
                return []
            self.counters.paired += 1
            return [(image, self._latest)]

    def poll(self, now_ns: int) -> list[tuple[Any, Any]]:
        """Release (and count) images whose CameraInfo did not come (synchronized only)."""
        with self._lock:
            return [] if self._sync is None else self._pairs(self._sync.poll(now_ns))

    def _pairs(self, frames: list[SyncedFrame]) -> list[tuple[Any, Any]]:
        out = []
        for frame in frames:
            info = frame.cameras.get("info")
            if info is None:
                self.counters.unmatched += 1
                continue
            self.counters.paired += 1
            out.append((frame.lidar, info))
        return out
