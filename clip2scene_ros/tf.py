"""TF without rclpy: TransformStamped ⇄ 4×4 matrices and a pure ``TransformBuffer``.

(Over ~400 lines: the one LiDAR→camera TF policy and its three backends — bag buffer, own
listener, tf2 — live together so that they cannot drift apart.)

The replay tool reads /tf and /tf_static out of a bag and must answer "where was the LiDAR
relative to camera X at time t" exactly like tf2 would: walk the frame tree to the common
ancestor, interpolate each moving edge between its two nearest samples (slerp for the
rotation) and refuse to extrapolate. Conventions follow tf2: a TransformStamped with
``header.frame_id = parent`` and ``child_frame_id = child`` maps child coordinates into the
parent frame, and ``lookup(target, source, t)`` returns T with ``p_target = T @ p_source``.

`TfResolver` is the one LiDAR → camera policy of the node and the replay tool (motion
compensation through a fixed frame, or a plain lookup), over either backend: this
`TransformBuffer` (replay) or a tf2_ros.Buffer behind `Tf2Backend` (node).
"""
from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from clip2scene_core.errors import TransformError
from clip2scene_core.geometry.transforms import (
    invert_transform, make_transform, matrix_to_quat_xyzw, quat_wxyz_to_matrix, slerp_wxyz,
)

from .msgs import MessageFactory, default_factory, make_header, stamp_to_ns

__all__ = ["transform_to_matrix", "matrix_to_transform", "TransformBuffer", "DEFAULT_CACHE_NS",
           "TfBackend", "Tf2Backend", "TfResolver", "AUTO_FIXED_FRAME", "AUTO_FIXED_FRAME_CANDIDATES",
           "NO_FIXED_FRAME", "ListenerBuffer", "QUATERNION_NORMALIZATION_TOLERANCE"]

DEFAULT_CACHE_NS = 10_000_000_000  # tf2's default cache time: 10 s
#: tf2's rule, used by every path here (TransformBuffer / ListenerBuffer.add,
#: transform_to_matrix): BufferCore::setTransform accepts a rotation when
#: |w² + x² + y² + z² − 1| < 10e-3 (its QUATERNION_NORMALIZATION_TOLERANCE, on the *squared*
#: norm, i.e. a norm within about ±0.5 %) and refuses NaN; what it stores is the normalised
#: rotation (tf2::Transform builds its matrix with 2/|q|²). So a quaternion of norm 1.003 is
#: accepted and normalised, one of norm 1.006 refused, by the node (tf2) and the replay alike.
QUATERNION_NORMALIZATION_TOLERANCE = 10e-3


def _float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise TransformError(f"{what}: {type(value).__name__} is not a number") from None


def _quat_wxyz(rotation: Any, what: str) -> np.ndarray:
    """Unit (w, x, y, z) quaternion of a geometry_msgs/Quaternion, by tf2's rule
    (`QUATERNION_NORMALIZATION_TOLERANCE`): nearly-unit ones are normalised, others refused."""
    try:
        q = np.array([_float(getattr(rotation, a), what) for a in "wxyz"], dtype=np.float64)
    except AttributeError:
        raise TransformError(f"{what}: rotation is not a geometry_msgs/Quaternion") from None
    with np.errstate(over="ignore", invalid="ignore"):
        n2 = float(np.dot(q, q))
    if not abs(n2 - 1.0) < QUATERNION_NORMALIZATION_TOLERANCE:   # NaN / inf fail too
        w, x, y, z = q.tolist()
        raise TransformError(f"{what}: rotation quaternion (x,y,z,w)={[x, y, z, w]} is not unit "
                             f"length (|q|² = {n2:.6g}; tf2 accepts |q|² within "
                             f"{QUATERNION_NORMALIZATION_TOLERANCE:g} of 1)")
    return q / np.sqrt(n2)


def _translation(t: Any, what: str) -> np.ndarray:
    try:
        v = np.array([_float(getattr(t, a), what) for a in "xyz"], dtype=np.float64)
    except AttributeError:
        raise TransformError(f"{what}: translation is not a geometry_msgs/Vector3") from None
    if not np.all(np.isfinite(v)):
        raise TransformError(f"{what}: translation is not finite: {v.tolist()}")
    return v


def _frame_id(value: Any) -> str:
    if not isinstance(value, str):
        raise TransformError(f"frame id of type {type(value).__name__}, expected a string")
    return value


def _short(frame: str, limit: int = 100) -> str:
    return frame if len(frame) <= limit else frame[:limit] + f"... ({len(frame)} chars)"


def _describe(msg: Any) -> str:
    try:
        if hasattr(msg, "child_frame_id"):
            return (f"transform {_short(str(msg.header.frame_id))!r} -> "
                    f"{_short(str(msg.child_frame_id))!r}")
    except AttributeError:
        pass
    return "transform"


def transform_to_matrix(transform: Any) -> np.ndarray:
    """4×4 float64 matrix of a ``geometry_msgs/Transform`` or ``TransformStamped``."""
    what = _describe(transform)
    tf_ = getattr(transform, "transform", transform)
    try:
        t, r = tf_.translation, tf_.rotation
    except AttributeError:
        raise TransformError(f"not a Transform / TransformStamped: {type(transform).__name__}") from None
    return make_transform(quat_wxyz_to_matrix(_quat_wxyz(r, what)), _translation(t, what))


def matrix_to_transform(T: np.ndarray, factory: MessageFactory | None = None, parent: str = "",
                        child: str = "", stamp_ns: int = 0) -> Any:
    """``geometry_msgs/TransformStamped`` (parent ← child) of a rigid 4×4 matrix."""
    factory = factory or default_factory()
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)) or not np.allclose(T[3], [0, 0, 0, 1]):
        raise TransformError(f"{parent!r} -> {child!r}: expected a finite rigid 4x4 matrix")
    x, y, z, w = matrix_to_quat_xyzw(T[:3, :3])  # raises TransformError if not a rotation
    tx, ty, tz = (float(v) for v in T[:3, 3])
    transform = factory.new(
        "Transform", translation=factory.new("Vector3", x=tx, y=ty, z=tz),
        rotation=factory.new("Quaternion", x=float(x), y=float(y), z=float(z), w=float(w)))
    return factory.new("TransformStamped", header=make_header(stamp_ns, parent, factory),
                       child_frame_id=str(child), transform=transform)


@dataclass
class _Edge:
    """Transforms parent ← child: one static sample, or a time-sorted dynamic history."""

    parent: str
    static: bool
    stamps: list[int] = field(default_factory=list)
    translations: list[np.ndarray] = field(default_factory=list)
    rotations: list[np.ndarray] = field(default_factory=list)  # (w, x, y, z)

    def insert(self, stamp: int, t: np.ndarray, q: np.ndarray) -> None:
        i = bisect.bisect_left(self.stamps, stamp)
        if i < len(self.stamps) and self.stamps[i] == stamp:  # same stamp again: newest wins
            self.translations[i], self.rotations[i] = t, q
            return
        self.stamps.insert(i, stamp)
        self.translations.insert(i, t)
        self.rotations.insert(i, q)

    def prune(self, cache_ns: int) -> None:
        """Forget samples older than the newest minus the cache duration."""
        cut = bisect.bisect_left(self.stamps, self.stamps[-1] - cache_ns)
        if cut:
            del self.stamps[:cut], self.translations[:cut], self.rotations[:cut]

    def matrix(self, stamp: int | None, tolerance_ns: int, child: str) -> np.ndarray:
        if self.static:
            return make_transform(quat_wxyz_to_matrix(self.rotations[0]), self.translations[0])
        first, last = self.stamps[0], self.stamps[-1]
        if stamp is None:
            stamp = last
        if stamp < first - tolerance_ns or stamp > last + tolerance_ns:
            raise TransformError(
                f"transform {self.parent!r} -> {child!r} is not available at {stamp} ns: buffer "
                f"holds [{first}, {last}] ns (tolerance {tolerance_ns} ns, no extrapolation)")
        stamp = min(max(stamp, first), last)
        i = bisect.bisect_left(self.stamps, stamp)
        if self.stamps[i] == stamp:
            return make_transform(quat_wxyz_to_matrix(self.rotations[i]), self.translations[i])
        s0, s1 = self.stamps[i - 1], self.stamps[i]
        a = (stamp - s0) / (s1 - s0)
        q = slerp_wxyz(self.rotations[i - 1], self.rotations[i], a)
        t = (1.0 - a) * self.translations[i - 1] + a * self.translations[i]
        return make_transform(quat_wxyz_to_matrix(q), t)


class TransformBuffer:
    """A tf2-like buffer of static and dynamic transforms, queried without ROS.

    Each child frame has one parent. Dynamic transforms keep ``cache_duration_ns`` of history
    (relative to the newest sample of that edge). Publishing a child under a new parent, or
    switching it between static and dynamic, replaces its history (tf2 would keep both; the
    replay tool never needs that and a mixed tree would be ambiguous).
    """

    def __init__(self, cache_duration_ns: int = DEFAULT_CACHE_NS, tolerance_ns: int = 0) -> None:
        if cache_duration_ns <= 0:
            raise TransformError(f"cache duration must be positive, got {cache_duration_ns} ns")
        if tolerance_ns < 0:
            raise TransformError(f"tolerance must not be negative, got {tolerance_ns} ns")
        self.cache_duration_ns = int(cache_duration_ns)
        self.tolerance_ns = int(tolerance_ns)   # default of every lookup (a `TfBackend` has none)
        self._edges: dict[str, _Edge] = {}

    # -- filling --------------------------------------------------------------------------------
    def add(self, msg: Any, static: bool = False) -> None:
        """Add one TransformStamped (``static`` for /tf_static)."""
        what = _describe(msg)
        try:
            parent = _frame_id(msg.header.frame_id).lstrip("/")
            child = _frame_id(msg.child_frame_id).lstrip("/")
            stamp = stamp_to_ns(msg.header.stamp)
            t_msg, r_msg = msg.transform.translation, msg.transform.rotation
        except (AttributeError, TypeError, ValueError, OverflowError) as exc:
            raise TransformError(f"{what}: not a geometry_msgs/TransformStamped: {exc}") from None
        if not parent or not child:
            raise TransformError(f"{what}: parent and child frame ids must be non-empty")
        if parent == child:
            raise TransformError(f"{what}: a frame cannot be its own parent")
        if child in self._ancestors(parent):
            raise TransformError(f"{what} would make a loop in the TF tree")
        t = _translation(t_msg, what)
        q = _quat_wxyz(r_msg, what)
        edge = self._edges.get(child)
        if edge is None or edge.parent != parent or edge.static != static:
            edge = self._edges[child] = _Edge(parent, static)
        if static:
            edge.stamps, edge.translations, edge.rotations = [stamp], [t], [q]
            return
        edge.insert(stamp, t, q)
        edge.prune(self.cache_duration_ns)

    def add_message(self, tf_message: Any, static: bool = False) -> int:
        """Add every transform of a ``tf2_msgs/TFMessage``; returns how many."""
        transforms = list(tf_message.transforms)
        for tr in transforms:
            self.add(tr, static)
        return len(transforms)

    def add_transforms(self, transforms: Iterable[Any], static: bool = False) -> None:
        for tr in transforms:
            self.add(tr, static)

    def clear(self) -> None:
        self._edges.clear()

    # -- queries --------------------------------------------------------------------------------
    @property
    def frames(self) -> set[str]:
        """Every frame named so far (children and parents)."""
        return set(self._edges) | {e.parent for e in self._edges.values()}

    def has_frame(self, frame: str) -> bool:
        return frame.lstrip("/") in self.frames

    def parent_of(self, frame: str) -> str | None:
        edge = self._edges.get(frame)
        return edge.parent if edge else None

    def time_range(self, frame: str) -> tuple[int, int] | None:
        """Buffered [first, last] stamps of ``frame``'s dynamic edge (None if static / root)."""
        edge = self._edges.get(frame)
        if edge is None or edge.static:
            return None
        return edge.stamps[0], edge.stamps[-1]

    def _ancestors(self, frame: str) -> list[str]:
        """``frame`` followed by its parent, grandparent, ... up to the root."""
        chain = [frame]
        while chain[-1] in self._edges:
            chain.append(self._edges[chain[-1]].parent)
            if len(chain) > len(self._edges) + 1:  # only reachable with a corrupted tree
                raise TransformError(f"loop in the TF tree above {frame!r}")
        return chain

    def _path(self, target: str, source: str) -> tuple[list[str], list[str]]:
        """Frames from source up to (excluding) the common ancestor, and from target likewise."""
        for f in (target, source):
            if f not in self.frames:
                known = ", ".join(sorted(self.frames)) or "none"
                raise TransformError(f"frame {f!r} is not in the TF tree (known frames: {known})")
        up_s, up_t = self._ancestors(source), self._ancestors(target)
        common = next((f for f in up_s if f in set(up_t)), None)
        if common is None:
            raise TransformError(f"frames {target!r} and {source!r} are not connected: their "
                                 f"roots are {up_t[-1]!r} and {up_s[-1]!r}")
        return up_s[:up_s.index(common)], up_t[:up_t.index(common)]

    def latest_common_stamp(self, target: str, source: str) -> int | None:
        """Newest time at which every dynamic edge between the frames is buffered (None: all static)."""
        s_path, t_path = self._path(target, source)
        dynamic = [self._edges[f] for f in s_path + t_path if not self._edges[f].static]
        if not dynamic:
            return None
        latest = min(e.stamps[-1] for e in dynamic)
        earliest = max(e.stamps[0] for e in dynamic)
        if latest < earliest:
            raise TransformError(f"the dynamic transforms between {target!r} and {source!r} have "
                                 "no time in common")
        return latest

    def lookup(self, target_frame: str, source_frame: str, stamp_ns: int | None = None,
               tolerance_ns: int | None = None) -> np.ndarray:
        """T (4×4) with ``p_target = T @ p_source`` at ``stamp_ns``.

        ``stamp_ns`` None (or 0, as tf2's "time zero") asks for the latest time every edge
        on the path has. Dynamic edges are interpolated; a stamp more than ``tolerance_ns``
        outside an edge's buffered range raises ``TransformError`` (within the tolerance the
        nearest sample is used); None: the buffer's ``tolerance_ns``.
        """
        target_frame, source_frame = target_frame.lstrip("/"), source_frame.lstrip("/")
        s_path, t_path = self._path(target_frame, source_frame)
        if not stamp_ns:
            stamp_ns = self.latest_common_stamp(target_frame, source_frame)
        tol = self.tolerance_ns if tolerance_ns is None else int(tolerance_ns)
        with np.errstate(all="ignore"):   # absurd (finite) translations: checked below
            T_common_source = np.eye(4)
            for f in s_path:  # source → ... → common ancestor
                T_common_source = self._edges[f].matrix(stamp_ns, tol, f) @ T_common_source
            T_common_target = np.eye(4)
            for f in t_path:
                T_common_target = self._edges[f].matrix(stamp_ns, tol, f) @ T_common_target
            T = invert_transform(T_common_target) @ T_common_source
        return _finite(T, target_frame, source_frame)

    def lookup_full(self, target_frame: str, target_stamp_ns: int | None, source_frame: str,
                    source_stamp_ns: int | None, fixed_frame: str, tolerance_ns: int | None = None
                    ) -> np.ndarray:
        """T with ``p_target(target_stamp) = T @ p_source(source_stamp)`` (tf2's time travel).

        Goes through ``fixed_frame`` (one that does not move, e.g. ``map`` / ``odom``): this is
        how a LiDAR sweep is put into a camera image taken a few ms later while the car moves.
        """
        T_fixed_source = self.lookup(fixed_frame, source_frame, source_stamp_ns, tolerance_ns)
        T_fixed_target = self.lookup(fixed_frame, target_frame, target_stamp_ns, tolerance_ns)
        with np.errstate(all="ignore"):
            T = invert_transform(T_fixed_target) @ T_fixed_source
        return _finite(T, target_frame, source_frame)

    def can_transform(self, target_frame: str, source_frame: str, stamp_ns: int | None = None,
                      tolerance_ns: int | None = None) -> bool:
        try:
            self.lookup(target_frame, source_frame, stamp_ns, tolerance_ns)
        except TransformError:
            return False
        return True


# -- one TF policy for the node and the replay tool ----------------------------------------------
AUTO_FIXED_FRAME = "auto"
#: spellings of "no fixed frame: plain lookup"; "none" because an empty string is awkward to
#: give in a params file or on a command line
NO_FIXED_FRAME = ("", "none")
#: what "auto" looks for, in order. odom first: it is continuous (REP 105), while map → odom
#: jumps at localisation updates, and a jump between the two stamps would be "compensated" too.
AUTO_FIXED_FRAME_CANDIDATES = ("odom", "map", "world")


class TfBackend(Protocol):
    """What `TfResolver` needs from a transform source (`TransformBuffer`, `Tf2Backend`).

    Both return T (4×4) with ``p_target = T @ p_source`` and raise ``TransformError`` when the
    transform is unavailable.
    """

    def lookup(self, target_frame: str, source_frame: str, stamp_ns: int) -> np.ndarray: ...

    def lookup_full(self, target_frame: str, target_stamp_ns: int, source_frame: str,
                    source_stamp_ns: int, fixed_frame: str) -> np.ndarray: ...

    def has_frame(self, frame: str) -> bool: ...


class Tf2Backend:
    """`TfBackend` over a ``tf2_ros.Buffer``, duck-typed so that this module never imports rclpy.

    The node passes rclpy's ``Time(nanoseconds=...)`` maker, a ``Duration`` timeout and tf2's
    ``TransformException``; tests pass look-alikes. tf2 waits up to ``timeout`` for missing data
    and never extrapolates (where `TransformBuffer` has a tolerance instead: a bag cannot wait).
    """

    def __init__(self, buffer: Any, make_time: Callable[[int], Any], timeout: Any = None, *,
                 errors: tuple[type[BaseException], ...]) -> None:
        self.buffer = buffer
        self.make_time = make_time
        self.timeout = timeout
        self.errors = errors   # what the buffer raises for "not available" → TransformError

    def _kw(self) -> dict[str, Any]:
        return {} if self.timeout is None else {"timeout": self.timeout}

    def lookup(self, target_frame: str, source_frame: str, stamp_ns: int) -> np.ndarray:
        try:
            msg = self.buffer.lookup_transform(target_frame, source_frame, self.make_time(stamp_ns),
                                               **self._kw())
        except self.errors as exc:
            raise TransformError(f"{source_frame} → {target_frame} at t={stamp_ns * 1e-9:.3f}: "
                                 f"{exc}") from None
        return transform_to_matrix(msg)

    def lookup_full(self, target_frame: str, target_stamp_ns: int, source_frame: str,
                    source_stamp_ns: int, fixed_frame: str) -> np.ndarray:
        try:
            msg = self.buffer.lookup_transform_full(
                target_frame, self.make_time(target_stamp_ns), source_frame,
                self.make_time(source_stamp_ns), fixed_frame, **self._kw())
        except self.errors as exc:
            raise TransformError(
                f"{source_frame} at t={source_stamp_ns * 1e-9:.3f} → {target_frame} at "
                f"t={target_stamp_ns * 1e-9:.3f} via {fixed_frame}: {exc}") from None
        return transform_to_matrix(msg)

    def has_frame(self, frame: str) -> bool:
        exists = getattr(self.buffer, "_frameExists", None)   # tf2 BufferCore (ROS 1 and 2)
        if exists is not None:
            return bool(exists(frame))
        import yaml   # public fallback: child frames with their parents

        tree = yaml.safe_load(self.buffer.all_frames_as_yaml() or "") or {}
        return frame in tree or any(isinstance(v, dict) and v.get("parent") == frame
                                    for v in tree.values())


class ListenerBuffer:
    """A tf2_ros-free TF listener's buffer: `TransformBuffer` + locking + waiting lookups.

    Where tf2_ros is not installed (rclpy from pip), the node subscribes to ``/tf`` and
    ``/tf_static`` itself and hands every ``tf2_msgs/TFMessage`` to `on_tf` / `on_tf_static`
    from its executor threads; the inference thread's lookups wait up to ``timeout_s`` for
    data that has not arrived yet, as ``tf2_ros.Buffer.lookup_transform(..., timeout)`` does.
    One bad transform in a message (non-unit quaternion, loop, empty frame) is counted in
    ``rejected`` and the others are kept. Implements `TfBackend`.
    """

    def __init__(self, timeout_s: float = 0.0, cache_duration_ns: int = DEFAULT_CACHE_NS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.buffer = TransformBuffer(cache_duration_ns)
        self.timeout_s = max(0.0, float(timeout_s))
        self.clock = clock
        self.rejected = 0
        self.last_error = ""
        self._cond = threading.Condition()

    # -- filling (subscription callbacks, any thread) ---------------------------------------------
    def on_tf(self, msg: Any) -> int:
        return self._add(msg, static=False)

    def on_tf_static(self, msg: Any) -> int:
        return self._add(msg, static=True)

    def _add(self, msg: Any, static: bool) -> int:
        added = 0
        try:
            transforms = list(getattr(msg, "transforms", ()))
        except TypeError:
            transforms = [msg]   # not a TFMessage: add() rejects it and it is counted
        with self._cond:
            for transform in transforms:
                try:
                    self.buffer.add(transform, static)
                    added += 1
                except (TransformError, AttributeError, TypeError, ValueError) as exc:
                    self.rejected += 1
                    self.last_error = str(exc)
            self._cond.notify_all()
        return added

    # -- TfBackend -----------------------------------------------------------------------------
    def _wait_for(self, query: Callable[[], np.ndarray]) -> np.ndarray:
        deadline = self.clock() + self.timeout_s
        with self._cond:
            while True:
                try:
                    return query()
                except TransformError:
                    remaining = deadline - self.clock()
                    if remaining <= 0:
                        raise
                    self._cond.wait(remaining)

    def lookup(self, target_frame: str, source_frame: str, stamp_ns: int) -> np.ndarray:
        return self._wait_for(lambda: self.buffer.lookup(target_frame, source_frame, stamp_ns))

    def lookup_full(self, target_frame: str, target_stamp_ns: int, source_frame: str,
                    source_stamp_ns: int, fixed_frame: str) -> np.ndarray:
        return self._wait_for(lambda: self.buffer.lookup_full(
            target_frame, target_stamp_ns, source_frame, source_stamp_ns, fixed_frame))

    def has_frame(self, frame: str) -> bool:
        with self._cond:
            return self.buffer.has_frame(frame)


class TfResolver:
    """LiDAR → camera transform of one image: the single TF policy of the node and of replay.

    Called as ``resolver(camera_frame, image_stamp_ns, lidar_frame, sweep_stamp_ns)`` (the
    pipeline's `TfLookup`). ``fixed_frame``:

    - a frame name (e.g. ``odom``): tf2's "time travel" lookup — camera pose at the image
      stamp, LiDAR pose at the sweep stamp, joined through that world-fixed frame, so the
      vehicle's motion between the two stamps is compensated (1–29 px on nuScenes);
    - ``""`` or ``"none"``: the plain lookup at the image stamp (the sweep is taken as if shot
      at the image time: right for a rig that does not move, or when no world frame is
      published);
    - ``"auto"``: the first of `AUTO_FIXED_FRAME_CANDIDATES` the TF tree has, else ``""``.

    A failed time-travel lookup (fixed frame absent, a pose missing at either stamp) falls
    back to the plain lookup instead of dropping the camera; it is counted in ``fallbacks``
    and ``on_fallback`` is told why, so the node can warn and the replay report can show it.
    """

    def __init__(self, backend: TfBackend, fixed_frame: str = AUTO_FIXED_FRAME,
                 on_fallback: Callable[[str], None] | None = None) -> None:
        self.backend = backend
        self.fixed_frame = str(fixed_frame).strip().lstrip("/")
        self.on_fallback = on_fallback
        self.fallbacks = 0

    def active_fixed_frame(self) -> str:
        """The frame the next lookup goes through ('' = plain lookup)."""
        if self.fixed_frame in NO_FIXED_FRAME:
            return ""
        if self.fixed_frame != AUTO_FIXED_FRAME:
            return self.fixed_frame
        return next((f for f in AUTO_FIXED_FRAME_CANDIDATES if self.backend.has_frame(f)), "")

    def __call__(self, target_frame: str, target_stamp_ns: int, source_frame: str,
                 source_stamp_ns: int) -> np.ndarray:
        fixed = self.active_fixed_frame()
        if fixed:
            if not self.backend.has_frame(fixed):   # do not wait out a tf2 timeout for nothing
                self._fallback(fixed, f"frame {fixed!r} is not in the TF tree")
            else:
                try:
                    return _matrix(self.backend.lookup_full(target_frame, target_stamp_ns,
                                                            source_frame, source_stamp_ns, fixed))
                except TransformError as exc:
                    self._fallback(fixed, str(exc))
        return _matrix(self.backend.lookup(target_frame, source_frame, target_stamp_ns))

    def _fallback(self, fixed: str, why: str) -> None:
        self.fallbacks += 1
        if self.on_fallback is not None:
            self.on_fallback(f"no motion-compensated transform through fixed frame {fixed!r} "
                             f"({why}): used the plain lookup at the image stamp")


def _matrix(T: Any) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise TransformError(f"a TF lookup returned shape {T.shape}, expected (4, 4)")
    return _finite(T, "target", "source")


def _finite(T: np.ndarray, target: str, source: str) -> np.ndarray:
    """T itself, or a TransformError when chaining absurd (finite) translations overflowed."""
    if not np.all(np.isfinite(T)):
        raise TransformError(f"transform {_short(str(source))!r} -> {_short(str(target))!r} is not "
                             "finite (translations too large to chain)")
    return T
