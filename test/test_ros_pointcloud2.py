"""PointCloud2 ⇄ numpy: random layouts through real CDR, checked against a struct reader."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clip2scene_core.errors import InvalidPointCloudError
from clip2scene_ros.msgs import MessageFactory, make_header
from clip2scene_ros.pointcloud2 import (
    FLOAT32, FLOAT64, UINT8, UINT16, UINT32, UNLABELED, cloud_to_scan, create_cloud,
    dtype_from_fields, fields_from_dtype, kept_field_values, labeled_cloud, labeled_cloud_like,
    make_point_field, pack_rgb, read_points, read_points_numpy, scan_to_cloud, unpack_rgb,
)

FACTORY = MessageFactory.from_rosbags("ROS2_HUMBLE")
TS = FACTORY.typestore
PC2 = "sensor_msgs/msg/PointCloud2"
# PointField datatype → (struct code, numpy dtype): the test's own table, not the module's.
STRUCT = {1: ("b", np.int8), 2: ("B", np.uint8), 3: ("h", np.int16), 4: ("H", np.uint16),
          5: ("i", np.int32), 6: ("I", np.uint32), 7: ("f", np.float32), 8: ("d", np.float64)}
NUSCENES_BIN = ("nuscenes/mmdet3d_demo_scene-0061/"
                "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin")


def cdr_roundtrip(msg):
    return TS.deserialize_cdr(TS.serialize_cdr(msg, PC2), PC2)


def struct_read(msg) -> dict[str, np.ndarray]:
    """Independent reader: struct.unpack every element of every point (row-major, flat)."""
    end = ">" if msg.is_bigendian else "<"
    raw = bytes(np.asarray(msg.data, dtype=np.uint8))
    out: dict[str, np.ndarray] = {}
    for f in msg.fields:
        code, dtype = STRUCT[f.datatype]
        size = struct.calcsize(code)
        for k in range(f.count):
            name = f"{f.name}_{k}" if f.count > 1 else f.name
            out[name] = np.array([struct.unpack_from(end + code, raw, r * msg.row_step
                                                     + c * msg.point_step + f.offset + k * size)[0]
                                  for r in range(msg.height) for c in range(msg.width)], dtype=dtype)
    return out


# ---- random layouts -------------------------------------------------------------------------
NAMES = ["x", "y", "z", "intensity", "ring", "t", "rgb", "normal", "label", "reflectivity"]


@st.composite
def layouts(draw):
    n = draw(st.integers(1, 5))
    names = draw(st.permutations(NAMES))[:n]
    specs, offset = [], 0
    for name in names:
        datatype = draw(st.integers(1, 8))
        count = draw(st.integers(1, 3))
        offset += draw(st.integers(0, 5))          # padding before the field (unaligned too)
        specs.append((name, offset, datatype, count))
        offset += struct.calcsize(STRUCT[datatype][0]) * count
    point_step = offset + draw(st.integers(0, 8))  # padding at the end of each point
    order = draw(st.permutations(range(n)))        # listed order differs from memory order
    return dict(specs=[specs[i] for i in order], point_step=point_step,
                big=draw(st.booleans()), height=draw(st.integers(1, 3)),
                width=draw(st.integers(0, 6)), row_pad=draw(st.integers(0, 7)),
                nan_rate=draw(st.sampled_from([0.0, 0.3])), seed=draw(st.integers(0, 2**32 - 1)))


def random_values(layout) -> dict[str, np.ndarray]:
    """Per-subfield values (height, width) covering each dtype's full range, NaN/inf in floats."""
    rng = np.random.default_rng(layout["seed"])
    shape = (layout["height"], layout["width"])
    values = {}
    for name, _, datatype, count in layout["specs"]:
        dt = np.dtype(STRUCT[datatype][1])
        for k in range(count):
            sub = f"{name}_{k}" if count > 1 else name
            if dt.kind == "f":
                v = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 6)).astype(dt)
                v[rng.random(shape) < layout["nan_rate"]] = np.nan
                v[rng.random(shape) < layout["nan_rate"] / 5] = np.inf
            else:
                info = np.iinfo(dt)
                v = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)
            values[sub] = v
    return values


def fields_of(layout):
    return [make_point_field(n, o, d, c, FACTORY) for n, o, d, c in layout["specs"]]


def struct_write(layout, values) -> object:
    """Independent writer: struct.pack into a buffer pre-filled with garbage padding bytes."""
    end = ">" if layout["big"] else "<"
    h, w, ps = layout["height"], layout["width"], layout["point_step"]
    row_step = w * ps + layout["row_pad"]
    buf = bytearray(b"\xab" * (row_step * h))
    for name, offset, datatype, count in layout["specs"]:
        code, _ = STRUCT[datatype]
        for k in range(count):
            sub = f"{name}_{k}" if count > 1 else name
            for r in range(h):
                for c in range(w):
                    struct.pack_into(end + code, buf, r * row_step + c * ps + offset
                                     + k * struct.calcsize(code), values[sub][r, c].item())
    cls = TS.types[PC2]
    return cls(header=make_header(123, "lidar", FACTORY), height=h, width=w,
               fields=fields_of(layout), is_bigendian=layout["big"], point_step=ps,
               row_step=row_step, data=np.frombuffer(bytes(buf), dtype=np.uint8).copy(),
               is_dense=False)


def expected_nan_mask(values) -> np.ndarray:
    mask = None
    for v in values.values():
        ok = ~np.isnan(v) if v.dtype.kind == "f" else np.ones(v.shape, bool)
        mask = ok if mask is None else mask & ok
    return mask.reshape(-1)


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(layouts())
def test_read_points_matches_struct_writer(layout):
    values = random_values(layout)
    msg = cdr_roundtrip(struct_write(layout, values))
    pts = read_points(msg)
    assert pts.shape == (layout["height"] * layout["width"],)
    assert set(pts.dtype.names) == set(values)
    for name, v in values.items():
        assert pts.dtype[name] == v.dtype
        np.testing.assert_array_equal(pts[name], v.reshape(-1))
    organised = read_points(msg, reshape_organized_cloud=True)
    if layout["height"] > 1:
        assert organised.shape == (layout["height"], layout["width"])
        for name, v in values.items():
            np.testing.assert_array_equal(organised[name], v)
    kept = read_points(msg, skip_nans=True)
    mask = expected_nan_mask(values)
    assert kept.shape == (int(mask.sum()),)
    for name, v in values.items():
        np.testing.assert_array_equal(kept[name], v.reshape(-1)[mask])


@SETTINGS
@given(layouts())
def test_create_then_read_roundtrip_and_struct_reader_agree(layout):
    values = random_values(layout)
    fields = fields_of(layout)
    dt = dtype_from_fields(fields).newbyteorder("=")
    points = np.empty((layout["height"], layout["width"]), dtype=dt)
    for name, v in values.items():
        points[name] = v
    if layout["height"] == 1:
        points = points[0]
    msg = cdr_roundtrip(create_cloud(make_header(7, "lidar", FACTORY), fields, points,
                                     point_step=layout["point_step"], is_bigendian=layout["big"],
                                     msg_factory=FACTORY))
    assert (msg.height, msg.width, msg.point_step) == (layout["height"], layout["width"],
                                                       layout["point_step"])
    assert msg.row_step == msg.point_step * msg.width
    assert bool(msg.is_bigendian) == layout["big"]
    floats = [v for v in values.values() if v.dtype.kind == "f"]
    assert msg.is_dense == all(np.isfinite(v).all() for v in floats)
    back = read_points(msg)
    independent = struct_read(msg)
    for name, v in values.items():
        np.testing.assert_array_equal(back[name], v.reshape(-1))
        np.testing.assert_array_equal(independent[name], v.reshape(-1))


def test_dtype_fields_roundtrip_and_count_expansion():
    fields = [make_point_field("xyz", 0, FLOAT32, 3, FACTORY),
              make_point_field("ring", 16, UINT16, 1, FACTORY)]
    dt = dtype_from_fields(fields, point_step=20, is_bigendian=True)
    assert dt.names == ("xyz_0", "xyz_1", "xyz_2", "ring")
    assert [dt.fields[n][1] for n in dt.names] == [0, 4, 8, 16]
    assert dt.itemsize == 20 and dt["ring"] == np.dtype(">u2")
    back = fields_from_dtype(dt, FACTORY)
    assert [(f.name, f.offset, f.datatype, f.count) for f in back] == [
        ("xyz_0", 0, 7, 1), ("xyz_1", 4, 7, 1), ("xyz_2", 8, 7, 1), ("ring", 16, 4, 1)]
    sub = np.dtype({"names": ["normal", "t"], "formats": [("<f8", (3,)), "<u4"],
                    "offsets": [0, 24]})
    assert [(f.name, f.offset, f.datatype, f.count) for f in fields_from_dtype(sub, FACTORY)] == [
        ("normal", 0, 8, 3), ("t", 24, 6, 1)]
    with pytest.raises(InvalidPointCloudError, match="cannot represent"):
        fields_from_dtype(np.dtype([("x", "<i8")]), FACTORY)


# ---- real LiDAR ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nuscenes_points(data_dir: Path) -> np.ndarray:
    pts = np.fromfile(data_dir / NUSCENES_BIN, dtype=np.float32).reshape(-1, 5)
    assert pts.shape == (34688, 5)
    return pts


def velodyne_fields():
    """velodyne_pointcloud's PointXYZIR layout: x y z, 4 B pad, intensity, ring (uint16), pad."""
    return [make_point_field("x", 0, FLOAT32, 1, FACTORY), make_point_field("y", 4, FLOAT32, 1, FACTORY),
            make_point_field("z", 8, FLOAT32, 1, FACTORY),
            make_point_field("intensity", 16, FLOAT32, 1, FACTORY),
            make_point_field("ring", 20, UINT16, 1, FACTORY)]


@pytest.mark.parametrize("big", [False, True])
def test_real_nuscenes_scan_roundtrip(nuscenes_points, big):
    pts = nuscenes_points
    cols = [pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3], pts[:, 4].astype(np.uint16)]
    dt = dtype_from_fields(velodyne_fields(), 32).newbyteorder("=")
    points = np.zeros(len(pts), dtype=dt)
    for name, c in zip(dt.names, cols):
        points[name] = c
    stamp = 1532402927647951000
    msg = cdr_roundtrip(create_cloud(make_header(stamp, "LIDAR_TOP", FACTORY), velodyne_fields(),
                                     points, point_step=32, is_bigendian=big, msg_factory=FACTORY))
    assert len(msg.data) == 32 * 34688
    scan, stats = cloud_to_scan(msg, fields=("intensity", "ring"))
    assert scan.fields == ("x", "y", "z", "intensity", "ring")
    assert scan.frame_id == "LIDAR_TOP" and scan.stamp_ns == stamp
    np.testing.assert_array_equal(scan.points, pts)
    assert (stats.n_points, stats.n_kept, stats.n_nonfinite) == (34688, 34688, 0)
    assert stats.missing_fields == () and stats.kept.all()
    xyz = read_points_numpy(msg, ["x", "y", "z"])
    np.testing.assert_array_equal(xyz, pts[:, :3])
    with pytest.raises(InvalidPointCloudError, match="different datatypes"):
        read_points_numpy(msg, ["x", "ring"])
    np.testing.assert_array_equal(read_points_numpy(msg, ["x", "ring"], dtype=np.float64)[:, 1],
                                  pts[:, 4])
    # a few points through the independent reader (it is slow in pure Python)
    sel = np.array([0, 1, 17, 20000, 34687])
    sub = read_points(msg, uvs=sel)
    for i, j in enumerate(sel):
        x, y, z = struct.unpack_from((">" if big else "<") + "3f", bytes(msg.data[32 * j:32 * j + 12]))
        assert (sub["x"][i], sub["y"][i], sub["z"][i]) == (x, y, z)


def test_real_scan_organised_with_nans(nuscenes_points):
    """32 x 1084 organised cloud with no-return points (NaN / inf) as a driver publishes them."""
    pts = nuscenes_points[:, :4].copy()
    rng = np.random.default_rng(0)
    nan_rows = rng.choice(len(pts), 500, replace=False)
    pts[nan_rows[:400], :3] = np.nan
    pts[nan_rows[400:], 1] = np.inf
    pts[nan_rows[:50], 3] = np.nan                      # already dropped: no feature count
    feat_bad = rng.choice(np.setdiff1d(np.arange(len(pts)), nan_rows), 7, replace=False)
    pts[feat_bad, 3] = np.nan
    organised = pts.reshape(32, 1084, 4)
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, FACTORY)
              for i, n in enumerate(["x", "y", "z", "intensity"])]
    msg = cdr_roundtrip(create_cloud(make_header(1, "lidar", FACTORY), fields, organised,
                                     msg_factory=FACTORY))
    assert (msg.height, msg.width, msg.is_dense) == (32, 1084, False)
    scan, stats = cloud_to_scan(msg)
    finite = np.isfinite(pts[:, :3]).all(axis=1)
    assert stats.organized and stats.n_nonfinite == 500 == int((~finite).sum())
    np.testing.assert_array_equal(stats.kept, finite)
    assert stats.n_feature_nonfinite == 7 and len(scan) == len(pts) - 500
    expected = pts[finite]
    expected[~np.isfinite(expected[:, 3]), 3] = 0.0
    np.testing.assert_array_equal(scan.points, expected)
    grid = read_points(msg, reshape_organized_cloud=True)
    assert grid.shape == (32, 1084)
    np.testing.assert_array_equal(grid["intensity"], organised[..., 3])
    u, v = 1000, 31
    np.testing.assert_array_equal(read_points(msg, uvs=[(u, v)])["x"], organised[v, u, 0])
    # sensor_msgs_py semantics: a cloud that claims to be dense is not filtered
    dense_claim = create_cloud(msg.header, fields, organised, is_dense=True, msg_factory=FACTORY)
    assert read_points(dense_claim, skip_nans=True).shape == (len(pts),)
    # skip_nans drops NaN only (as sensor_msgs_py); the inf points stay
    not_nan = ~np.isnan(pts[:, :3]).any(axis=1)
    assert read_points(msg, ["x", "y", "z"], skip_nans=True).shape == (int(not_nan.sum()),) == (
        len(pts) - 400,)


def test_duck_typed_rclpy_like_message(nuscenes_points):
    """rclpy messages hold data as array.array('B') and fields as plain objects: read them too."""
    import array
    from types import SimpleNamespace
    pts = nuscenes_points[:500, :4]
    fields = [SimpleNamespace(name=n, offset=4 * i, datatype=FLOAT32, count=1)
              for i, n in enumerate(["x", "y", "z", "intensity"])]
    stamp = SimpleNamespace(sec=1532402927, nanosec=647951000)
    msg = SimpleNamespace(header=SimpleNamespace(stamp=stamp, frame_id="LIDAR_TOP"), height=1,
                          width=500, fields=fields, is_bigendian=False, point_step=16,
                          row_step=16 * 500, data=array.array("B", pts.tobytes()), is_dense=True)
    scan, stats = cloud_to_scan(msg)
    np.testing.assert_array_equal(scan.points, pts)
    assert scan.stamp_ns == 1532402927647951000 and stats.n_kept == 500


def test_cloud_to_scan_missing_and_aliased_fields(nuscenes_points):
    pts = nuscenes_points[:1000]
    xyz_only = [make_point_field(n, 4 * i, FLOAT32, 1, FACTORY) for i, n in enumerate("xyz")]
    msg = create_cloud(make_header(0, "lidar", FACTORY), xyz_only, pts[:, :3], msg_factory=FACTORY)
    scan, stats = cloud_to_scan(msg)
    assert stats.missing_fields == ("intensity",)
    np.testing.assert_array_equal(scan.column("intensity"), np.zeros(1000, np.float32))
    kitti = xyz_only + [make_point_field("remission", 12, FLOAT32, 1, FACTORY)]
    msg = create_cloud(msg.header, kitti, pts[:, :4], msg_factory=FACTORY)
    scan, stats = cloud_to_scan(msg)
    assert stats.field_sources == {"intensity": "remission"} and stats.missing_fields == ()
    np.testing.assert_array_equal(scan.column("intensity"), pts[:, 3])
    no_z = create_cloud(msg.header, xyz_only[:2], pts[:, :2], msg_factory=FACTORY)
    with pytest.raises(InvalidPointCloudError, match=r"no \['z'\]"):
        cloud_to_scan(no_z)


def test_scan_to_cloud_roundtrip(nuscenes_points):
    from clip2scene_core.types import Scan
    scan = Scan(nuscenes_points[:, :4], ("x", "y", "z", "intensity"), "LIDAR_TOP", 42)
    back, _ = cloud_to_scan(cdr_roundtrip(scan_to_cloud(scan, msg_factory=FACTORY)))
    np.testing.assert_array_equal(back.points, scan.points)
    assert (back.frame_id, back.stamp_ns) == ("LIDAR_TOP", 42)


# ---- labelled output cloud -------------------------------------------------------------------
@pytest.mark.parametrize("with_intensity", [True, False])
def test_labeled_cloud_real_scan(nuscenes_points, with_intensity):
    pts = nuscenes_points
    rng = np.random.default_rng(1)
    labels = (pts[:, 4].astype(np.int64) % 17)
    labels[pts[:, 2] < -1.5] = -1                      # "dropped" points
    scores = rng.random(len(pts)).astype(np.float32)
    rgb = rng.integers(0, 256, (len(pts), 3), dtype=np.uint8)
    msg = cdr_roundtrip(labeled_cloud(make_header(5, "LIDAR_TOP", FACTORY), pts[:, :3], labels,
                                      scores, pts[:, 3] if with_intensity else None, rgb,
                                      msg_factory=FACTORY))
    names = [f.name for f in msg.fields]
    assert names == ["x", "y", "z"] + (["intensity"] if with_intensity else []) + [
        "label", "score", "rgb"]
    types = {f.name: f.datatype for f in msg.fields}
    assert types["label"] == UINT32 and types["score"] == FLOAT32 and types["rgb"] == FLOAT32
    assert all(f.offset % 4 == 0 for f in msg.fields if f.datatype in (FLOAT32, UINT32))
    back = read_points(msg)
    assert back["label"].dtype == np.uint32
    np.testing.assert_array_equal(back["label"], np.where(labels < 0, UNLABELED, labels))
    assert (back["label"] == UNLABELED).sum() == (labels == -1).sum() > 0
    np.testing.assert_array_equal(back["score"], scores)
    np.testing.assert_array_equal(unpack_rgb(back["rgb"]), rgb)
    if with_intensity:
        np.testing.assert_array_equal(back["intensity"], pts[:, 3])
    # RViz reads the 4 bytes of "rgb" as 0x00RRGGBB (little-endian uint32)
    rgb_off = {f.name: f.offset for f in msg.fields}["rgb"]
    raw = bytes(msg.data)
    for j in (0, 123, len(pts) - 1):
        (bits,) = struct.unpack_from("<I", raw, j * msg.point_step + rgb_off)
        r, g, b = (int(c) for c in rgb[j])
        assert bits == (r << 16) | (g << 8) | b
    # the label as PCL's PointXYZL reads it: 4 bytes, little-endian uint32
    label_off = {f.name: f.offset for f in msg.fields}["label"]
    for j in np.flatnonzero(labels == -1)[:3].tolist() + [0, len(pts) - 1]:
        (value,) = struct.unpack_from("<I", raw, j * msg.point_step + label_off)
        assert value == (UNLABELED if labels[j] < 0 else labels[j])


def uint8_intensity_cloud(pts: np.ndarray):
    """A driver-style cloud: FLOAT32 x y z, UINT8 intensity, UINT16 ring, 16-byte points."""
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, FACTORY) for i, n in enumerate("xyz")] + [
        make_point_field("intensity", 12, UINT8, 1, FACTORY),
        make_point_field("ring", 14, UINT16, 1, FACTORY)]
    dt = dtype_from_fields(fields, 16).newbyteorder("=")
    points = np.zeros(len(pts), dtype=dt)
    for i, c in enumerate("xyz"):
        points[c] = pts[:, i]
    points["intensity"] = pts[:, 3].astype(np.uint8)      # nuScenes intensity is 0..255
    points["ring"] = pts[:, 4].astype(np.uint16)
    return cdr_roundtrip(create_cloud(make_header(7, "LIDAR_TOP", FACTORY), fields, points,
                                      point_step=16, msg_factory=FACTORY))


def test_uint8_intensity_keeps_its_datatype(nuscenes_points):
    pts = nuscenes_points.copy()
    pts[::50, 0] = np.nan                                  # some points without a return
    msg = uint8_intensity_cloud(pts)
    scan, stats = cloud_to_scan(msg)
    assert scan.points.dtype == np.float32                 # the model still gets floats
    assert stats.field_dtypes == {"intensity": np.dtype(np.uint8)}
    kept = np.isfinite(pts[:, 0])
    values = kept_field_values(msg, stats, "intensity")
    assert values.dtype == np.uint8
    np.testing.assert_array_equal(values, pts[kept, 3].astype(np.uint8))
    np.testing.assert_array_equal(scan.column("intensity"), values.astype(np.float32))
    assert kept_field_values(msg, stats, "ring") is None    # not a Scan column
    out = cdr_roundtrip(labeled_cloud(msg.header, scan.xyz, np.zeros(len(scan), np.int64),
                                      np.ones(len(scan)), values, msg_factory=FACTORY))
    types = {f.name: f.datatype for f in out.fields}
    assert types["intensity"] == UINT8 and types["label"] == UINT32
    back = read_points(out)
    assert back["intensity"].dtype == np.uint8
    np.testing.assert_array_equal(back["intensity"], values)
    # float32 stays FLOAT32; a type PointField lacks (int64) becomes FLOAT32; or ask for one
    for intensity, datatype, want in ((values.astype(np.float32), None, FLOAT32),
                                  (values.astype(np.int64), None, FLOAT32),
                                  (values, FLOAT64, FLOAT64)):
        o = labeled_cloud(msg.header, scan.xyz, np.zeros(len(scan), np.int64), np.ones(len(scan)),
                          intensity, msg_factory=FACTORY, intensity_datatype=datatype)
        assert {f.name: f.datatype for f in o.fields}["intensity"] == want
        np.testing.assert_array_equal(read_points(o)["intensity"], values)


def organised_driver_cloud(pts: np.ndarray, big: bool = False):
    """32 x 1084 organised real scan in an Ouster-like layout with extra fields, NaN rows, an
    old UINT16 ``label`` and a 2-element field; returns (message, the values written)."""
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, FACTORY) for i, n in enumerate("xyz")] + [
        make_point_field("label", 12, UINT16, 1, FACTORY),          # replaced by ours
        make_point_field("intensity", 16, FLOAT32, 1, FACTORY),
        make_point_field("t", 20, UINT32, 1, FACTORY),
        make_point_field("reflectivity", 24, UINT8, 1, FACTORY),
        make_point_field("ring", 26, UINT16, 1, FACTORY),
        make_point_field("time", 32, FLOAT64, 1, FACTORY),
        make_point_field("normal", 40, FLOAT32, 2, FACTORY)]
    dt = dtype_from_fields(fields, 48).newbyteorder("=")
    n = len(pts)
    v = np.zeros(n, dtype=dt)
    for i, c in enumerate("xyz"):
        v[c] = pts[:, i]
    v["label"] = 7
    v["intensity"] = pts[:, 3]
    v["t"] = np.arange(n, dtype=np.uint32) * 1000 + 3_000_000_000      # above int32
    v["reflectivity"] = (np.nan_to_num(pts[:, 3]) * 0.5).astype(np.uint8)
    v["ring"] = np.nan_to_num(pts[:, 4]).astype(np.uint16)
    v["time"] = np.linspace(0, 0.05, n)
    v["normal_0"], v["normal_1"] = pts[:, 2], -pts[:, 2]
    grid = v.reshape(32, 1084)
    msg = cdr_roundtrip(create_cloud(make_header(9, "os_lidar", FACTORY), fields, grid,
                                     point_step=48, is_bigendian=big, msg_factory=FACTORY))
    return msg, grid


@pytest.mark.parametrize("big", [False, True])
def test_labeled_cloud_like_keeps_the_input_layout(nuscenes_points, big):
    pts = nuscenes_points.copy()
    pts[np.arange(0, len(pts), 1084 * 5)[:, None] + np.arange(1084)[None, :]] = np.nan  # rows 0, 5, ..
    msg, grid = organised_driver_cloud(pts, big)
    scan, stats = cloud_to_scan(msg)
    kept = stats.kept
    assert stats.organized and (~kept).sum() == 7 * 1084
    labels = np.full(len(pts), -1, np.int64)
    labels[kept] = pts[kept, 4].astype(np.int64) % 5
    scores = np.where(kept, 0.75, 0.0).astype(np.float32)
    rgb = np.zeros((len(pts), 3), np.uint8)
    rgb[:, 1] = labels.clip(0) * 40
    out = cdr_roundtrip(labeled_cloud_like(msg, labels, scores, rgb, msg_factory=FACTORY))
    assert (out.height, out.width, out.is_dense, out.is_bigendian) == (32, 1084, False, False)
    assert out.header.frame_id == "os_lidar" and out.header.stamp.nanosec == 9
    got = {f.name: (f.offset, f.datatype, f.count) for f in out.fields}
    want_passed = {f.name: (f.offset, f.datatype, f.count) for f in msg.fields if f.name != "label"}
    assert {k: got[k] for k in want_passed} == want_passed      # same offsets, types, counts
    assert [f.name for f in out.fields][-3:] == ["label", "score", "rgb"]
    assert got["label"][1:] == (UINT32, 1) and got["label"][0] >= 48 and got["label"][0] % 4 == 0
    back = read_points(out, reshape_organized_cloud=True)
    assert back.shape == (32, 1084)
    for name in grid.dtype.names:
        if name != "label":
            assert back[name].dtype == grid[name].dtype
            np.testing.assert_array_equal(back[name], grid[name])   # NaN xyz kept as NaN
    assert back["label"].dtype == np.uint32
    np.testing.assert_array_equal(back["label"].reshape(-1), np.where(labels < 0, UNLABELED, labels))
    assert (back["label"][~kept.reshape(32, 1084)] == UNLABELED).all()
    np.testing.assert_array_equal(back["score"].reshape(-1), scores)
    np.testing.assert_array_equal(unpack_rgb(back["rgb"].reshape(-1)), rgb)
    # select: those points only, unorganised, same fields
    select = kept & (labels == 2)
    sub = cdr_roundtrip(labeled_cloud_like(msg, labels, scores, rgb, select=select, msg_factory=FACTORY))
    assert (sub.height, sub.width, sub.is_dense) == (1, int(select.sum()), True)
    assert [(f.name, f.offset, f.datatype, f.count) for f in sub.fields] == \
        [(f.name, f.offset, f.datatype, f.count) for f in out.fields]
    sub_pts = read_points(sub)
    np.testing.assert_array_equal(sub_pts, read_points(out)[select])
    assert (sub_pts["label"] == 2).all()
    # a dense input stays dense; a wrong-sized result is refused
    dense = pts.copy()
    dense[~kept] = 0
    dmsg, _ = organised_driver_cloud(dense)
    assert labeled_cloud_like(dmsg, labels, scores, msg_factory=FACTORY).is_dense
    with pytest.raises(InvalidPointCloudError, match="labels must have shape"):
        labeled_cloud_like(msg, labels[:-1], scores, msg_factory=FACTORY)
    with pytest.raises(InvalidPointCloudError, match="select"):
        labeled_cloud_like(msg, labels, scores, select=np.ones(5, bool), msg_factory=FACTORY)


def test_labeled_cloud_like_empty_and_xyz_only(nuscenes_points):
    xyz_only = [make_point_field(n, 4 * i, FLOAT32, 1, FACTORY) for i, n in enumerate("xyz")]
    empty = create_cloud(make_header(0, "l", FACTORY), xyz_only, np.zeros((0, 3), np.float32),
                         msg_factory=FACTORY)
    out = labeled_cloud_like(empty, np.zeros(0, np.int64), np.zeros(0), msg_factory=FACTORY)
    assert out.width * out.height == 0
    assert [f.name for f in out.fields] == ["x", "y", "z", "label", "score"]
    msg = create_cloud(empty.header, xyz_only, nuscenes_points[:100, :3], msg_factory=FACTORY)
    out = labeled_cloud_like(msg, np.arange(100), np.zeros(100), msg_factory=FACTORY)
    assert [(f.name, f.offset) for f in out.fields] == [
        ("x", 0), ("y", 4), ("z", 8), ("label", 12), ("score", 16)] and out.point_step == 20


def test_pack_rgb_bits():
    packed = pack_rgb(np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3]], np.uint8))
    assert packed.dtype == np.float32
    assert packed.view(np.uint32).tolist() == [0xFF0000, 0x00FF00, 0x0000FF, 0x010203]


def test_labeled_cloud_rejects_bad_inputs(nuscenes_points):
    xyz = nuscenes_points[:10, :3]
    h = make_header(0, "l", FACTORY)
    with pytest.raises(InvalidPointCloudError, match="labels must be in"):
        labeled_cloud(h, xyz, np.full(10, 70000), np.zeros(10), msg_factory=FACTORY)
    with pytest.raises(InvalidPointCloudError, match="scores must have shape"):
        labeled_cloud(h, xyz, np.zeros(10, int), np.zeros(9), msg_factory=FACTORY)
    with pytest.raises(InvalidPointCloudError, match="integers"):
        labeled_cloud(h, xyz, np.zeros(10), np.zeros(10), msg_factory=FACTORY)


# ---- malformed messages ----------------------------------------------------------------------
def good_msg():
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, FACTORY) for i, n in enumerate("xyz")]
    return create_cloud(make_header(0, "l", FACTORY), fields,
                        np.arange(24, dtype=np.float32).reshape(2, 4, 3), msg_factory=FACTORY)


@pytest.mark.parametrize("mutate, match", [
    (lambda m: setattr(m, "data", m.data[:-1]), "data has 95 bytes"),
    (lambda m: setattr(m, "data", np.concatenate([m.data, m.data])), "data has 192 bytes"),
    (lambda m: setattr(m, "point_step", 8), "extend beyond point_step"),
    (lambda m: setattr(m, "row_step", 40), "row_step 40 < width"),
    (lambda m: setattr(m.fields[1], "datatype", 9), "unknown datatype 9"),
    (lambda m: setattr(m.fields[1], "count", 0), "count 0"),
    (lambda m: setattr(m.fields[1], "name", "x"), "duplicate field name 'x'"),
])
def test_malformed_clouds_raise(mutate, match):
    msg = good_msg()
    mutate(msg)
    with pytest.raises(InvalidPointCloudError, match=match):
        read_points(msg)


def test_bad_requests_raise():
    msg = good_msg()
    with pytest.raises(InvalidPointCloudError, match=r"\['intensity'\] not in the cloud"):
        read_points(msg, ["x", "intensity"])
    with pytest.raises(InvalidPointCloudError, match="uvs"):
        read_points(msg, uvs=[8])
    assert read_points(msg, skip_nans=True, reshape_organized_cloud=True).shape == (2, 4)  # dense
    msg.is_dense = False
    with pytest.raises(InvalidPointCloudError, match="cannot be combined"):
        read_points(msg, skip_nans=True, reshape_organized_cloud=True)
    fields = list(msg.fields)
    with pytest.raises(InvalidPointCloudError, match="unstructured points"):
        create_cloud(msg.header, fields, np.zeros((5, 2), np.float32), msg_factory=FACTORY)
    with pytest.raises(InvalidPointCloudError, match="values span"):
        create_cloud(msg.header, [make_point_field("ring", 0, UINT16, 1, FACTORY)],
                     np.array([[70000.0]]), msg_factory=FACTORY)
    with pytest.raises(InvalidPointCloudError, match="NaN"):
        create_cloud(msg.header, [make_point_field("ring", 0, UINT16, 1, FACTORY)],
                     np.array([[np.nan]]), msg_factory=FACTORY)


# ---- bounded work per message (issue 9) -----------------------------------------------------
def xyz_cloud(n: int = 4):
    pts = np.arange(3 * n, dtype=np.float32).reshape(n, 3)
    fields = [make_point_field(c, 4 * i, FLOAT32, 1, FACTORY) for i, c in enumerate("xyz")]
    return create_cloud(make_header(1, "lidar", FACTORY), fields, pts, msg_factory=FACTORY)


@pytest.mark.parametrize("count", [4_000_000_000, 100_000, 1025])
def test_huge_point_field_count_is_refused_before_any_work(count):
    """A PointField count is a free uint32: it used to expand name by name with an O(count²)
    duplicate check (the node's inference thread hung for ever)."""
    cloud = xyz_cloud()
    cloud.fields.append(make_point_field("big", 12, UINT8, count, FACTORY))
    with pytest.raises(InvalidPointCloudError, match="1024|65536"):
        cloud_to_scan(cloud)


def test_point_step_of_3e9_is_a_clear_error():
    """point_step = 3e9 is a legal uint32; numpy raised a bare ValueError the pipeline missed."""
    cloud = xyz_cloud()
    cloud.point_step = 3_000_000_000
    with pytest.raises(InvalidPointCloudError, match="point_step 3000000000 exceeds 65536"):
        cloud_to_scan(cloud)
    with pytest.raises(InvalidPointCloudError):
        read_points(cloud)


@pytest.mark.parametrize("height, width", [(2**32 - 1, 2**32 - 1), (1, 2**26), (2**13, 2**13)])
def test_huge_height_times_width_is_refused(height, width):
    cloud = xyz_cloud()
    cloud.height, cloud.width = height, width
    with pytest.raises(InvalidPointCloudError, match="points exceeds the limit"):
        cloud_to_scan(cloud)


@pytest.mark.parametrize("mutate, match", [
    (lambda c: setattr(c, "height", -1), "must not be negative"),
    (lambda c: setattr(c, "row_step", -8), "must not be negative"),
    (lambda c: setattr(c, "fields", [make_point_field("x", 2**32 - 1, FLOAT32, 1, FACTORY)]), "ends beyond"),
    (lambda c: setattr(c, "fields", [make_point_field("x", 0, FLOAT32, 1, FACTORY)] * 2000), "PointFields"),
    (lambda c: setattr(c, "data", object()), "not a byte array"),
    (lambda c: setattr(c, "header", None), "header"),
])
def test_malformed_duck_typed_clouds_raise_project_errors(mutate, match):
    cloud = xyz_cloud()
    mutate(cloud)
    with pytest.raises(InvalidPointCloudError, match=match):
        cloud_to_scan(cloud)


def test_a_cloud_at_the_field_limit_still_gets_its_labelled_output():
    """1024 values per point are accepted, and the labelled cloud in the input's layout (which
    appends label / score / rgb) can still be written."""
    from clip2scene_ros.pointcloud2 import MAX_FIELDS

    fields = [make_point_field(c, 4 * i, FLOAT32, 1, FACTORY) for i, c in enumerate("xyz")]
    fields.append(make_point_field("desc", 12, UINT8, MAX_FIELDS - 3, FACTORY))
    step = 12 + MAX_FIELDS - 3
    data = np.zeros((2, step), np.uint8)
    data[:, :12] = np.arange(6, dtype=np.float32).reshape(2, 3).view(np.uint8)
    cloud = FACTORY.new("PointCloud2", header=make_header(1, "l", FACTORY), height=1, width=2,
                        fields=fields, point_step=step, row_step=2 * step,
                        data=FACTORY.uint8_data(data.reshape(-1)), is_dense=True)
    scan, stats = cloud_to_scan(cloud, ())
    assert len(scan) == 2
    out = labeled_cloud_like(cloud, np.zeros(2, np.int64), np.ones(2, np.float32), msg_factory=FACTORY)
    assert [f.name for f in out.fields][-2:] == ["label", "score"]
    too_many = list(fields) + [make_point_field("extra", step, UINT8, 1, FACTORY)]
    cloud.fields, cloud.point_step = too_many, step + 1
    with pytest.raises(InvalidPointCloudError, match="1024"):
        cloud_to_scan(cloud)


def test_float64_values_beyond_float32_are_non_finite_points_not_warnings():
    fields = [make_point_field(c, 8 * i, FLOAT64, 1, FACTORY) for i, c in enumerate("xyz")]
    pts = np.array([[1e300, 0, 0], [1.0, 2.0, 3.0]])
    cloud = create_cloud(make_header(1, "l", FACTORY), fields, pts, msg_factory=FACTORY)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan, stats = cloud_to_scan(cloud, ())
    assert stats.n_nonfinite == 1 and len(scan) == 1
