"""TF without rclpy: TransformStamped ⇄ 4×4 matrices and a pure ``TransformBuffer``.

The replay tool reads /tf and /tf_static out of a bag and must answer "where was the LiDAR
relative to camera X at time t" exactly like tf2 would: walk the frame tree to the common
ancestor, interpolate each moving edge between its two nearest samples (slerp for the
rotation) and refuse to extrapolate. Conventions follow tf2: a TransformStamped with
``header.frame_id = parent`` and ``child_frame_id = child`` maps child coordinates into the
parent frame, and ``lookup(target, source, t)`` returns T with ``p_target = T @ p_source``.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from clip2scene_core.errors import TransformError
from clip2scene_core.geometry.transforms import (
    invert_transform, make_transform, matrix_to_quat_xyzw, quat_wxyz_to_matrix, slerp_wxyz,
)

from .msgs import MessageFactory, default_factory, make_header, stamp_to_ns

__all__ = ["transform_to_matrix", "matrix_to_transform", "TransformBuffer", "DEFAULT_CACHE_NS"]

DEFAULT_CACHE_NS = 10_000_000_000  # tf2's default cache time: 10 s
_QUAT_NORM_TOL = 1e-3              # tf2 rejects quaternions that are not (nearly) unit length


def _quat_wxyz(rotation: Any, what: str) -> np.ndarray:
    """Unit (w, x, y, z) quaternion of a geometry_msgs/Quaternion; refuses non-unit ones."""
    q = np.array([rotation.w, rotation.x, rotation.y, rotation.z], dtype=np.float64)
    n = float(np.linalg.norm(q)) if np.all(np.isfinite(q)) else float("nan")
    if not abs(n - 1.0) <= _QUAT_NORM_TOL:
        raise TransformError(f"{what}: rotation quaternion (x,y,z,w)="
                             f"{[rotation.x, rotation.y, rotation.z, rotation.w]} is not unit length")
    return q / n


def _translation(t: Any, what: str) -> np.ndarray:
    v = np.array([t.x, t.y, t.z], dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise TransformError(f"{what}: translation is not finite: {v.tolist()}")
    return v


def _describe(msg: Any) -> str:
    if hasattr(msg, "child_frame_id"):
        return f"transform {msg.header.frame_id!r} -> {msg.child_frame_id!r}"
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

    def __init__(self, cache_duration_ns: int = DEFAULT_CACHE_NS) -> None:
        if cache_duration_ns <= 0:
            raise TransformError(f"cache duration must be positive, got {cache_duration_ns} ns")
        self.cache_duration_ns = int(cache_duration_ns)
        self._edges: dict[str, _Edge] = {}

    # -- filling --------------------------------------------------------------------------------
    def add(self, msg: Any, static: bool = False) -> None:
        """Add one TransformStamped (``static`` for /tf_static)."""
        what = _describe(msg)
        parent, child = str(msg.header.frame_id).lstrip("/"), str(msg.child_frame_id).lstrip("/")
        if not parent or not child:
            raise TransformError(f"{what}: parent and child frame ids must be non-empty")
        if parent == child:
            raise TransformError(f"{what}: a frame cannot be its own parent")
        if child in self._ancestors(parent):
            raise TransformError(f"{what} would make a loop in the TF tree")
        t = _translation(msg.transform.translation, what)
        q = _quat_wxyz(msg.transform.rotation, what)
        edge = self._edges.get(child)
        if edge is None or edge.parent != parent or edge.static != static:
            edge = self._edges[child] = _Edge(parent, static)
        if static:
            edge.stamps, edge.translations, edge.rotations = [stamp_to_ns(msg.header.stamp)], [t], [q]
            return
        edge.insert(stamp_to_ns(msg.header.stamp), t, q)
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
               tolerance_ns: int = 0) -> np.ndarray:
        """T (4×4) with ``p_target = T @ p_source`` at ``stamp_ns``.

        ``stamp_ns`` None (or 0, as tf2's "time zero") asks for the latest time every edge
        on the path has. Dynamic edges are interpolated; a stamp more than ``tolerance_ns``
        outside an edge's buffered range raises ``TransformError`` (within the tolerance the
        nearest sample is used).
        """
        target_frame, source_frame = target_frame.lstrip("/"), source_frame.lstrip("/")
        s_path, t_path = self._path(target_frame, source_frame)
        if not stamp_ns:
            stamp_ns = self.latest_common_stamp(target_frame, source_frame)
        tol = int(tolerance_ns)
        T_common_source = np.eye(4)
        for f in s_path:  # source → ... → common ancestor
            T_common_source = self._edges[f].matrix(stamp_ns, tol, f) @ T_common_source
        T_common_target = np.eye(4)
        for f in t_path:
            T_common_target = self._edges[f].matrix(stamp_ns, tol, f) @ T_common_target
        return invert_transform(T_common_target) @ T_common_source

    def lookup_full(self, target_frame: str, target_stamp_ns: int | None, source_frame: str,
                    source_stamp_ns: int | None, fixed_frame: str, tolerance_ns: int = 0
                    ) -> np.ndarray:
        """T with ``p_target(target_stamp) = T @ p_source(source_stamp)`` (tf2's time travel).

        Goes through ``fixed_frame`` (one that does not move, e.g. ``map`` / ``odom``): this is
        how a LiDAR sweep is put into a camera image taken a few ms later while the car moves.
        """
        T_fixed_source = self.lookup(fixed_frame, source_frame, source_stamp_ns, tolerance_ns)
        T_fixed_target = self.lookup(fixed_frame, target_frame, target_stamp_ns, tolerance_ns)
        return invert_transform(T_fixed_target) @ T_fixed_source

    def can_transform(self, target_frame: str, source_frame: str, stamp_ns: int | None = None,
                      tolerance_ns: int = 0) -> bool:
        try:
            self.lookup(target_frame, source_frame, stamp_ns, tolerance_ns)
        except TransformError:
            return False
        return True
