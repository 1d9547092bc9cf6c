"""TF conversions, TransformBuffer and the node's / replay's TfResolver on real nuScenes ego
poses and sensor calibrations."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from clip2scene_core.errors import TransformError
from clip2scene_ros.msgs import MessageFactory
from clip2scene_ros.tf import (ListenerBuffer, Tf2Backend, TfResolver, TransformBuffer, matrix_to_transform,
                               transform_to_matrix)

FACTORY = MessageFactory.from_rosbags("ROS2_HUMBLE")
TS = FACTORY.typestore
TFM = "tf2_msgs/msg/TFMessage"
TABLES = "nuscenes/dororo99_v1.0-extract_3samples/v1.0-extract-subset"
LOG = "n008-2018-08-30-10-33-52-0400"


# ---- independent maths (axis-angle via OpenCV's Rodrigues, not quaternions) ------------------
def pose(translation, quat_wxyz) -> np.ndarray:
    w, x, y, z = np.asarray(quat_wxyz, dtype=np.float64) / np.linalg.norm(quat_wxyz)
    angle = 2.0 * np.arctan2(np.linalg.norm([x, y, z]), w)
    axis = np.array([x, y, z]) / max(np.linalg.norm([x, y, z]), 1e-300)
    T = np.eye(4)
    T[:3, :3] = cv2.Rodrigues(axis * angle)[0]
    T[:3, 3] = translation
    return T


def geodesic(T0: np.ndarray, T1: np.ndarray, a: float) -> np.ndarray:
    """R0 · exp(a · log(R0ᵀ R1)), translation linear: what slerp must equal."""
    rel = cv2.Rodrigues(T0[:3, :3].T @ T1[:3, :3])[0]
    T = np.eye(4)
    T[:3, :3] = T0[:3, :3] @ cv2.Rodrigues(a * rel)[0]
    T[:3, 3] = (1 - a) * T0[:3, 3] + a * T1[:3, 3]
    return T


def inv(T: np.ndarray) -> np.ndarray:
    return np.linalg.inv(T)


def assert_pose_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal to 1 µrad, and 1 µm plus that angle's lever arm: slerp of nearly parallel
    quaternions is a normalised lerp, ~1e-8 rad off the exact geodesic for these ~1° turns,
    which the 2 km map → LiDAR translation turns into tens of µm."""
    np.testing.assert_allclose(actual[:3, :3], expected[:3, :3], rtol=0, atol=1e-6)
    lever = 1e-6 + 2e-8 * np.linalg.norm(expected[:3, 3])
    np.testing.assert_allclose(actual[:3, 3], expected[:3, 3], rtol=0, atol=lever)
    np.testing.assert_array_equal(actual[3], [0, 0, 0, 1])


# ---- real data --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nuscenes(data_dir: Path) -> dict:
    """Ego poses (µs → 4×4) and sensor calibrations of one real log."""
    load = lambda name: json.loads((data_dir / TABLES / f"{name}.json").read_text())  # noqa: E731
    ego = {e["token"]: e for e in load("ego_pose")}
    calib = {c["token"]: c for c in load("calibrated_sensor")}
    sensors = {s["token"]: s["channel"] for s in load("sensor")}
    poses: dict[str, list[tuple[int, np.ndarray]]] = {}
    sensor_to_ego: dict[str, np.ndarray] = {}
    intrinsics: dict[str, np.ndarray] = {}
    for sd in load("sample_data"):
        if LOG not in sd["filename"]:
            continue
        cs = calib[sd["calibrated_sensor_token"]]
        channel = sensors[cs["sensor_token"]]
        sensor_to_ego[channel] = pose(cs["translation"], cs["rotation"])
        e = ego[sd["ego_pose_token"]]
        poses.setdefault(channel, []).append((e["timestamp"] * 1000, pose(e["translation"], e["rotation"])))
        if cs.get("camera_intrinsic"):
            intrinsics[channel] = np.asarray(cs["camera_intrinsic"], dtype=np.float64)
    return {"poses": {k: sorted(v, key=lambda p: p[0]) for k, v in poses.items()},
            "sensor_to_ego": sensor_to_ego, "K": intrinsics}


def tf_message(transforms):
    msg = TS.types[TFM](transforms=list(transforms))
    return TS.deserialize_cdr(TS.serialize_cdr(msg, TFM), TFM)   # real CDR round-trip


def build_buffer(nuscenes, channels=("LIDAR_TOP",), cache_ns=10_000_000_000) -> TransformBuffer:
    buf = TransformBuffer(cache_ns)
    static = [matrix_to_transform(T, FACTORY, "base_link", ch, 0)
              for ch, T in nuscenes["sensor_to_ego"].items()]
    assert buf.add_message(tf_message(static), static=True) == 7  # 6 cameras + LIDAR_TOP
    for ch in channels:
        for stamp, T in nuscenes["poses"][ch]:
            buf.add_message(tf_message([matrix_to_transform(T, FACTORY, "map", "base_link", stamp)]))
    return buf


# ---- tests -----------------------------------------------------------------------------------
def test_matrix_transform_roundtrip_real_calibrations(nuscenes):
    for ch, T in nuscenes["sensor_to_ego"].items():
        msg = tf_message([matrix_to_transform(T, FACTORY, "base_link", ch, 1234)]).transforms[0]
        assert (msg.header.frame_id, msg.child_frame_id) == ("base_link", ch)
        assert msg.header.stamp.sec == 0 and msg.header.stamp.nanosec == 1234
        np.testing.assert_allclose(transform_to_matrix(msg), T, atol=1e-12)
        np.testing.assert_allclose(transform_to_matrix(msg.transform), T, atol=1e-12)


def test_static_chain_through_common_ancestor(nuscenes):
    buf = build_buffer(nuscenes)
    s2e = nuscenes["sensor_to_ego"]
    T = buf.lookup("CAM_FRONT", "LIDAR_TOP")
    np.testing.assert_allclose(T, inv(s2e["CAM_FRONT"]) @ s2e["LIDAR_TOP"], atol=1e-12)
    np.testing.assert_allclose(buf.lookup("LIDAR_TOP", "CAM_FRONT"), inv(T), atol=1e-12)
    np.testing.assert_allclose(buf.lookup("LIDAR_TOP", "LIDAR_TOP"), np.eye(4))


def test_dynamic_lookup_exact_and_interpolated(nuscenes):
    buf = build_buffer(nuscenes, channels=("LIDAR_TOP",))   # two real poses, 0.5 s apart
    (t0, P0), (t1, P1) = nuscenes["poses"]["LIDAR_TOP"]
    lidar = nuscenes["sensor_to_ego"]["LIDAR_TOP"]
    np.testing.assert_allclose(buf.lookup("map", "LIDAR_TOP", t0), P0 @ lidar, atol=1e-9)
    np.testing.assert_allclose(buf.lookup("map", "LIDAR_TOP", t1), P1 @ lidar, atol=1e-9)
    for a in (0.0123457, 0.3141593, 0.5, 0.9876543):
        t = t0 + int(round(a * (t1 - t0)))
        alpha = (t - t0) / (t1 - t0)
        expected = geodesic(P0, P1, alpha) @ lidar
        assert_pose_close(buf.lookup("map", "LIDAR_TOP", t), expected)
        assert_pose_close(buf.lookup("LIDAR_TOP", "map", t), inv(expected))
    # the poses nuScenes recorded at the camera stamps lie close to the interpolation
    cams = [(t, P) for ch in nuscenes["poses"] if ch.startswith("CAM")
            for t, P in nuscenes["poses"][ch] if t0 <= t <= t1]
    assert len(cams) == 6
    for t, P in cams:
        T = buf.lookup("map", "base_link", t)
        assert np.linalg.norm(T[:3, 3] - P[:3, 3]) < 0.05
        assert np.degrees(np.linalg.norm(cv2.Rodrigues(T[:3, :3].T @ P[:3, :3])[0])) < 0.2


def test_time_travel_lidar_to_camera_through_map(nuscenes):
    """LiDAR sweep at its stamp into each camera at the camera's own stamp (moving car)."""
    buf = build_buffer(nuscenes, channels=tuple(nuscenes["poses"]))
    s2e = nuscenes["sensor_to_ego"]
    (t_lidar, E_lidar) = nuscenes["poses"]["LIDAR_TOP"][1]
    for cam in [c for c in s2e if c.startswith("CAM")]:
        t_cam, E_cam = nuscenes["poses"][cam][1]
        T = buf.lookup_full(cam, t_cam, "LIDAR_TOP", t_lidar, "map")
        expected = inv(E_cam @ s2e[cam]) @ E_lidar @ s2e["LIDAR_TOP"]
        np.testing.assert_allclose(T, expected, atol=1e-9)
        # the car moved between the stamps: ignoring it would be centimetres off
        static = buf.lookup(cam, "LIDAR_TOP")
        assert np.linalg.norm(static[:3, 3] - T[:3, 3]) > 0.005


def test_extrapolation_refused_and_tolerance(nuscenes):
    buf = build_buffer(nuscenes, channels=("LIDAR_TOP",))
    (t0, P0), (t1, P1) = nuscenes["poses"]["LIDAR_TOP"]
    # a camera stamp 1.7 ms before the first LiDAR pose is outside the buffer
    early = nuscenes["poses"]["CAM_BACK_LEFT"][0][0]
    assert early < t0
    with pytest.raises(TransformError, match="not available"):
        buf.lookup("map", "LIDAR_TOP", early)
    with pytest.raises(TransformError, match="no extrapolation"):
        buf.lookup("map", "LIDAR_TOP", t1 + 1)
    lidar = nuscenes["sensor_to_ego"]["LIDAR_TOP"]
    np.testing.assert_allclose(buf.lookup("map", "LIDAR_TOP", early, tolerance_ns=t0 - early),
                               P0 @ lidar, atol=1e-9)
    assert not buf.can_transform("map", "LIDAR_TOP", early)
    assert buf.can_transform("map", "LIDAR_TOP", early, tolerance_ns=2_000_000)
    # time zero / None: the latest common time
    np.testing.assert_allclose(buf.lookup("map", "LIDAR_TOP"), P1 @ lidar, atol=1e-9)
    np.testing.assert_allclose(buf.lookup("map", "LIDAR_TOP", 0), P1 @ lidar, atol=1e-9)


def test_dynamic_on_both_sides_of_the_common_ancestor(nuscenes):
    """map ← base_link (all 14 poses) and map ← follower (the LiDAR poses, 20 m behind)."""
    buf = build_buffer(nuscenes, channels=tuple(ch for ch in nuscenes["poses"]))
    behind = np.eye(4)
    behind[0, 3] = -20.0
    lidar_poses = nuscenes["poses"]["LIDAR_TOP"]
    for stamp, P in lidar_poses:
        buf.add(matrix_to_transform(P @ behind, FACTORY, "map", "follower", stamp))
    all_poses = sorted(p for ch in nuscenes["poses"].values() for p in ch)
    assert buf.time_range("base_link") == (all_poses[0][0], all_poses[-1][0])
    assert buf.latest_common_stamp("CAM_FRONT", "follower") == lidar_poses[-1][0]
    cam = nuscenes["sensor_to_ego"]["CAM_FRONT"]
    (t0, P0), (t1, P1) = lidar_poses
    for (ta, A), (tb, B) in zip(all_poses[6:-1], all_poses[7:]):   # inside the LiDAR range
        t = (ta + tb) // 2
        ego = geodesic(A, B, (t - ta) / (tb - ta))
        # the follower edge interpolates its own samples (P @ behind), not P then offset
        follower = geodesic(P0 @ behind, P1 @ behind, (t - t0) / (t1 - t0))
        expected = inv(ego @ cam) @ follower
        assert_pose_close(buf.lookup("CAM_FRONT", "follower", t), expected)


def test_cache_duration_bounds_history(nuscenes):
    buf = build_buffer(nuscenes, channels=tuple(nuscenes["poses"]), cache_ns=300_000_000)
    all_stamps = sorted(t for ch in nuscenes["poses"].values() for t, _ in ch)
    first, last = buf.time_range("base_link")
    assert last == all_stamps[-1] and first >= last - 300_000_000 and first > all_stamps[0]
    with pytest.raises(TransformError, match="not available"):
        buf.lookup("map", "LIDAR_TOP", all_stamps[0])


def test_unknown_disconnected_and_invalid_transforms(nuscenes):
    buf = build_buffer(nuscenes)
    with pytest.raises(TransformError, match="'radar' is not in the TF tree"):
        buf.lookup("radar", "LIDAR_TOP")
    buf.add(matrix_to_transform(np.eye(4), FACTORY, "odom", "wheel", 5))
    with pytest.raises(TransformError, match="not connected"):
        buf.lookup("wheel", "LIDAR_TOP")
    with pytest.raises(TransformError, match="loop"):
        buf.add(matrix_to_transform(np.eye(4), FACTORY, "LIDAR_TOP", "map", 5))
    bad = matrix_to_transform(np.eye(4), FACTORY, "map", "x", 5)
    bad.transform.rotation.w = 0.5
    with pytest.raises(TransformError, match="not unit length"):
        buf.add(bad)
    with pytest.raises(TransformError, match="not unit length"):
        transform_to_matrix(bad)
    bad.transform.rotation.w = 1.0
    bad.transform.translation.x = float("nan")
    with pytest.raises(TransformError, match="not finite"):
        buf.add(bad)
    with pytest.raises(TransformError, match="rigid"):
        matrix_to_transform(np.full((4, 4), 2.0), FACTORY, "a", "b")
    with pytest.raises(TransformError, match="rotation"):
        matrix_to_transform(np.diag([1.0, 1.0, -1.0, 1.0]), FACTORY, "a", "b")


def test_reparenting_replaces_history(nuscenes):
    buf = build_buffer(nuscenes)
    T = np.eye(4)
    T[2, 3] = 1.0
    buf.add(matrix_to_transform(T, FACTORY, "odom", "base_link", 7), static=True)
    assert buf.parent_of("base_link") == "odom" and buf.time_range("base_link") is None
    np.testing.assert_allclose(buf.lookup("odom", "LIDAR_TOP", 123),
                               T @ nuscenes["sensor_to_ego"]["LIDAR_TOP"], atol=1e-12)


def test_stamp_helpers_roundtrip_through_cdr():
    from types import SimpleNamespace

    from clip2scene_ros.msgs import make_header, ns_to_stamp, stamp_to_ns
    typ = "std_msgs/msg/Header"
    for ns in (0, 1, 999_999_999, 1_000_000_000, 1535639716699138000, 2**31 * 10**9 - 1):
        header = TS.deserialize_cdr(TS.serialize_cdr(make_header(ns, "f", FACTORY), typ), typ)
        assert stamp_to_ns(header.stamp) == ns and 0 <= header.stamp.nanosec < 10**9
        assert stamp_to_ns(ns_to_stamp(ns, FACTORY)) == ns
    assert stamp_to_ns(SimpleNamespace(secs=3, nsecs=5)) == 3_000_000_005   # rospy style
    ros1 = MessageFactory.from_rosbags("ROS1_NOETIC")
    assert make_header(7, "f", ros1).seq == 0


# ---- TfResolver: one policy over the replay backend and a tf2-like (node) backend --------------
class FakeTime:
    """rclpy.time.Time look-alike (what node.py hands tf2)."""

    def __init__(self, *, nanoseconds: int = 0) -> None:
        self.nanoseconds = nanoseconds


class FakeDuration:
    def __init__(self, *, seconds: float = 0.0) -> None:
        self.seconds = seconds


class FakeTf2Exception(Exception):
    """tf2_ros.TransformException look-alike: not a Clip2SceneError."""


class FakeTf2Buffer:
    """tf2_ros.Buffer's query API (Time arguments in, TransformStamped out, tf2 exceptions)
    implemented over a TransformBuffer — test only, where ROS 2 cannot be installed."""

    def __init__(self, buf: TransformBuffer) -> None:
        self.buf = buf
        self.calls: list[tuple] = []

    def _frameExists(self, frame: str) -> bool:
        return self.buf.has_frame(frame)

    def _answer(self, query, target: str, source: str, stamp: FakeTime):
        try:
            T = query()
        except TransformError as exc:
            raise FakeTf2Exception(str(exc)) from None
        return matrix_to_transform(T, FACTORY, target, source, stamp.nanoseconds)

    def lookup_transform(self, target, source, time, timeout=None):
        assert isinstance(time, FakeTime) and isinstance(timeout, FakeDuration)
        self.calls.append(("lookup_transform", target, source, time.nanoseconds))
        return self._answer(lambda: self.buf.lookup(target, source, time.nanoseconds), target, source, time)

    def lookup_transform_full(self, target, target_time, source, source_time, fixed, timeout=None):
        assert isinstance(target_time, FakeTime) and isinstance(source_time, FakeTime)
        assert isinstance(timeout, FakeDuration)
        self.calls.append(("lookup_transform_full", target, target_time.nanoseconds, source,
                           source_time.nanoseconds, fixed))
        return self._answer(lambda: self.buf.lookup_full(target, target_time.nanoseconds, source,
                                                         source_time.nanoseconds, fixed),
                            target, source, target_time)


def node_backend(buf: TransformBuffer) -> Tf2Backend:
    """What node.py builds over tf2_ros.Buffer, with the look-alikes."""
    return Tf2Backend(FakeTf2Buffer(buf), lambda ns: FakeTime(nanoseconds=ns),
                      FakeDuration(seconds=0.05), errors=(FakeTf2Exception,))


def pixel_shift(K: np.ndarray, T_a: np.ndarray, T_b: np.ndarray, T_ref: np.ndarray) -> float:
    """Median |uv_a - uv_b| (px) of points 5-40 m in front of the camera (placed with T_ref)."""
    u, v, d = np.meshgrid(np.linspace(100, 1500, 8), np.linspace(100, 800, 6), [5.0, 10.0, 20.0, 40.0])
    rays = np.linalg.inv(K) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
    cam = rays * d.ravel()
    lidar = inv(T_ref) @ np.vstack([cam, np.ones(cam.shape[1])])

    def project(T):
        p = (T @ lidar)[:3]
        return (K @ p)[:2] / p[2]

    return float(np.median(np.linalg.norm(project(T_a) - project(T_b), axis=0)))


def test_resolver_is_one_policy_for_the_node_and_replay_backends(nuscenes):
    """Same matrix from tf2's lookup_transform_full (node) and the bag's TransformBuffer (replay);
    it is the motion-compensated chain, pixels away from the plain lookup on this moving car."""
    buf = build_buffer(nuscenes, channels=tuple(nuscenes["poses"]))
    s2e = nuscenes["sensor_to_ego"]
    t_lidar, E_lidar = nuscenes["poses"]["LIDAR_TOP"][1]
    node, replay = TfResolver(node_backend(buf), "auto"), TfResolver(buf, "auto")
    tf2 = node.backend.buffer
    assert node.active_fixed_frame() == replay.active_fixed_frame() == "map"
    node_plain, replay_plain = TfResolver(node.backend, "none"), TfResolver(buf, "")
    shifts = {}
    for cam in sorted(c for c in s2e if c.startswith("CAM")):
        t_cam, E_cam = nuscenes["poses"][cam][1]
        T_node = node(cam, t_cam, "LIDAR_TOP", t_lidar)
        T_replay = replay(cam, t_cam, "LIDAR_TOP", t_lidar)
        np.testing.assert_allclose(T_node, T_replay, atol=1e-9)
        assert tf2.calls[-1] == ("lookup_transform_full", cam, t_cam, "LIDAR_TOP", t_lidar, "map")
        # independent: camera pose at the image stamp, LiDAR pose at the sweep stamp
        np.testing.assert_allclose(T_replay, inv(E_cam @ s2e[cam]) @ E_lidar @ s2e["LIDAR_TOP"],
                                   atol=1e-9)
        # plain lookup at the image stamp: the rig calibration, for both backends alike
        plain = node_plain(cam, t_cam, "LIDAR_TOP", t_lidar)
        assert tf2.calls[-1] == ("lookup_transform", cam, "LIDAR_TOP", t_cam)
        np.testing.assert_allclose(plain, replay_plain(cam, t_cam, "LIDAR_TOP", t_lidar), atol=1e-9)
        np.testing.assert_allclose(plain, inv(s2e[cam]) @ s2e["LIDAR_TOP"], atol=1e-9)
        shifts[cam] = pixel_shift(nuscenes["K"][cam], T_replay, plain, T_replay)
    assert node.fallbacks == replay.fallbacks == 0
    # the ego moved between the sweep and each exposure: compensation moves points by pixels
    assert max(shifts.values()) > 5.0 and min(shifts.values()) > 0.5, shifts


def test_resolver_falls_back_to_the_plain_lookup_the_same_way(nuscenes):
    buf = build_buffer(nuscenes, channels=tuple(nuscenes["poses"]))
    s2e = nuscenes["sensor_to_ego"]
    rig = inv(s2e["CAM_FRONT"]) @ s2e["LIDAR_TOP"]
    t_cam = nuscenes["poses"]["CAM_FRONT"][1][0]
    t_lidar = nuscenes["poses"]["LIDAR_TOP"][1][0]
    for make in (lambda b: b, node_backend):
        # a fixed frame the tree lacks: plain lookup, counted, and why
        why: list[str] = []
        odom = TfResolver(make(buf), "odom", on_fallback=why.append)
        np.testing.assert_allclose(odom("CAM_FRONT", t_cam, "LIDAR_TOP", t_lidar), rig, atol=1e-9)
        assert odom.fallbacks == 1 and "'odom' is not in the TF tree" in why[0]
        # the LiDAR pose is not buffered at the sweep stamp (a minute early): plain lookup
        mapped = TfResolver(make(buf), "map", on_fallback=why.append)
        np.testing.assert_allclose(mapped("CAM_FRONT", t_cam, "LIDAR_TOP", t_lidar - 60 * 10**9),
                                   rig, atol=1e-9)
        assert mapped.fallbacks == 1 and "'map'" in why[1] and "not available" in why[1]
        # when the plain lookup fails too, the camera gets a TransformError (tf2's is converted)
        with pytest.raises(TransformError, match="CAM_NOWHERE"):
            mapped("CAM_NOWHERE", t_cam, "LIDAR_TOP", t_lidar)


def test_tf2_backend_frame_check_without_frame_exists():
    """Where a tf2 buffer lacks the private _frameExists, its YAML dump tells the frames."""
    class YamlOnly:
        def all_frames_as_yaml(self):
            return ("base_link: {parent: 'map', broadcaster: 'default_authority', rate: 10.0}\n"
                    "lidar_top: {parent: 'base_link', broadcaster: 'default_authority', rate: 10000.0}\n")

    backend = Tf2Backend(YamlOnly(), lambda ns: ns, errors=(FakeTf2Exception,))
    assert backend.has_frame("map") and backend.has_frame("lidar_top")
    assert not backend.has_frame("odom")
    assert TfResolver(backend, "auto").active_fixed_frame() == "map"


# ---- the node's own /tf listener (where tf2_ros is not installed) ----------------------------
def test_listener_buffer_waits_for_late_transforms_like_tf2(nuscenes):
    """A lookup blocks until /tf brings the data (another thread), up to the timeout."""
    buf = ListenerBuffer(timeout_s=5.0)
    static = tf_message([matrix_to_transform(T, FACTORY, "base_link", ch, 0)
                         for ch, T in nuscenes["sensor_to_ego"].items()])
    assert buf.on_tf_static(static) == 7
    (t0, T0), (t1, T1) = nuscenes["poses"]["LIDAR_TOP"][:2]
    buf.on_tf(tf_message([matrix_to_transform(T0, FACTORY, "map", "base_link", t0)]))
    mid = (t0 + t1) // 2
    late = threading.Timer(0.3, buf.on_tf, [tf_message([matrix_to_transform(
        T1, FACTORY, "map", "base_link", t1)])])
    started = time.monotonic()
    late.start()
    T = buf.lookup_full("CAM_FRONT", mid, "LIDAR_TOP", mid, "map")   # needs the second pose
    waited = time.monotonic() - started
    late.join()
    assert waited >= 0.25
    reference = build_buffer(nuscenes).lookup_full("CAM_FRONT", mid, "LIDAR_TOP", mid, "map")
    assert_pose_close(T, reference)
    assert buf.has_frame("map") and not buf.has_frame("odom")


def test_listener_buffer_times_out_and_counts_bad_transforms(nuscenes):
    buf = ListenerBuffer(timeout_s=0.2)
    with pytest.raises(TransformError, match="not in the TF tree"):
        buf.lookup("CAM_FRONT", "LIDAR_TOP", 0)
    good = matrix_to_transform(nuscenes["sensor_to_ego"]["CAM_FRONT"], FACTORY, "base_link",
                               "CAM_FRONT", 0)
    bad = matrix_to_transform(np.eye(4), FACTORY, "base_link", "LIDAR_TOP", 0)
    bad.transform.rotation.w = 2.0                       # not a unit quaternion
    loop = matrix_to_transform(np.eye(4), FACTORY, "CAM_FRONT", "base_link", 0)
    assert buf.on_tf_static(tf_message([bad, good, loop])) == 1
    assert buf.rejected == 2 and "loop" in buf.last_error
    np.testing.assert_allclose(buf.lookup("base_link", "CAM_FRONT", 0),
                               nuscenes["sensor_to_ego"]["CAM_FRONT"], atol=1e-12)
    # TfResolver over it: the same policy as over tf2 (plain lookup: no world frame here)
    resolver = TfResolver(buf, "auto")
    assert resolver.active_fixed_frame() == ""


# ---- one quaternion tolerance: tf2's (issue 9) ------------------------------------------------
def _scaled(norm: float, parent: str = "base_link", child: str = "cam"):
    """A 30° yaw, its quaternion scaled to ``norm``, 1 m ahead."""
    T = np.eye(4)
    T[:3, :3] = cv2.Rodrigues(np.array([0.0, 0.0, np.radians(30)]))[0]
    T[0, 3] = 1.0
    msg = matrix_to_transform(T, FACTORY, parent, child, 5)
    r = msg.transform.rotation
    r.x, r.y, r.z, r.w = (v * norm for v in (r.x, r.y, r.z, r.w))
    return msg, T


@pytest.mark.parametrize("norm, accepted", [
    (1.0, True), (1.003, True), (0.997, True),       # |q|² within 0.01 of 1: tf2 takes it
    (1.0049, True), (1.0051, False), (0.9949, False),  # |q|² = 1.0102 / 0.9898: tf2 refuses
    (2.0, False), (float("nan"), False), (float("inf"), False),
])
def test_every_path_uses_tf2s_quaternion_rule(norm, accepted):
    """The replay dropped all six cameras over a quaternion of norm 1.003 that tf2 (the node)
    accepts. tf2's BufferCore::setTransform: |x²+y²+z²+w² − 1| < 10e-3, then the rotation is
    used normalised. TransformBuffer, ListenerBuffer and transform_to_matrix follow it."""
    from clip2scene_ros.tf import QUATERNION_NORMALIZATION_TOLERANCE

    assert QUATERNION_NORMALIZATION_TOLERANCE == 10e-3
    msg, T = _scaled(norm)
    buf, listener = TransformBuffer(), ListenerBuffer(timeout_s=0.0)
    listener.on_tf_static(tf_message([msg]))
    if accepted:
        buf.add(msg, static=True)
        for got in (transform_to_matrix(msg), buf.lookup("base_link", "cam"),
                    listener.lookup("base_link", "cam", 0)):
            np.testing.assert_allclose(got, T, atol=1e-12)   # normalised, not scaled
        assert listener.rejected == 0
    else:
        with pytest.raises(TransformError, match="not unit length"):
            buf.add(msg, static=True)
        with pytest.raises(TransformError, match="not unit length"):
            transform_to_matrix(msg)
        assert listener.rejected == 1 and "not unit length" in listener.last_error


@pytest.mark.parametrize("mutate", [
    lambda m: setattr(m.header, "frame_id", None),
    lambda m: setattr(m, "header", None),
    lambda m: setattr(m.transform.rotation, "w", "one"),
    lambda m: setattr(m.transform, "translation", 3),
    lambda m: setattr(m.header, "stamp", "now"),
])
def test_malformed_transforms_are_transform_errors(mutate):
    msg, _ = _scaled(1.0)
    mutate(msg)
    with pytest.raises(TransformError):
        TransformBuffer().add(msg)
    listener = ListenerBuffer()
    assert listener.on_tf(FACTORY.new("TFMessage", transforms=[msg])) == 0 and listener.rejected == 1


def test_chaining_absurd_translations_is_an_error_not_nan():
    """Found by test_fuzz_messages: a finite translation of 1.8e308 overflowed into NaN."""
    msg, _ = _scaled(1.0, "map", "odom")
    msg.transform.translation.x = msg.transform.translation.y = 1.7e308   # finite, yawed 30°
    buf = TransformBuffer()
    buf.add(msg)
    with pytest.raises(TransformError, match="not finite"):
        buf.lookup("odom", "map", 5)
    with pytest.raises(TransformError, match="not finite"):
        TfResolver(buf, "none")("odom", 5, "map", 5)
    assert TfResolver(buf, "auto")("map", 5, "map", 5).tolist() == np.eye(4).tolist()   # fallback
