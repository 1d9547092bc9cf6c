"""The per-sweep fast paths around the network give what the straightforward code gives.

`voxelize` (float32 range test, one value sort of packed keys), `cloud_to_scan` (column-wise
NaN handling, no second copy) and the output clouds (filled once in the message's own
buffer, packed colour table) are compared on the real scans of test/data with reference
implementations written here the plain way: float64 arithmetic and ``np.unique(axis=0)``,
boolean row masks, ``colorize`` + ``pack_rgb``, a zeroed structured array with the published
layout spelled out. Equality is bitwise.
"""
from __future__ import annotations

import array
import os
from pathlib import Path

import numpy as np
import pytest

from clip2scene_core.palette import colorize, pack_rgb, palette_for
from clip2scene_core.types import Scan
from clip2scene_core.voxelize import VoxelConfig, voxelize
from clip2scene_ros.msgs import MessageFactory, make_header
from clip2scene_ros.output_schema import encode_labels, encode_rgb, output_columns
from clip2scene_ros.pointcloud2 import (FLOAT32, FLOAT64, UINT8, cloud_to_scan, create_cloud,
                                        kept_field_values, make_point_field, output_cloud,
                                        read_points)

SCANS = {   # file, columns, field names
    "nuscenes": ("nuscenes/mmdet3d_demo_scene-0061/"
                 "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin", 5,
                 ("x", "y", "z", "intensity", "ring")),
    "semantickitti": ("semantickitti/squeezesegv3_sample_data/sequences/00/velodyne/000000.bin", 4,
                      ("x", "y", "z", "intensity")),
    "rellis3d": ("rellis3d/utils_example/000104.bin", 4, ("x", "y", "z", "intensity")),
}
SCANNET = "scannet/mmdet3d_demo/scene0000_00.bin"
RANGE = (-60.0, -60.0, -5.0, 60.0, 60.0, 5.0)
ODD_RANGE = (-10.3, -7.77, -1.1, 12.9, 8.1, 0.7)   # bounds float32 cannot hold exactly
VOXELS_FIELDS = ("coords", "features", "inverse", "point_mask", "point_coords", "point_features")


def _rclpy_factory() -> MessageFactory | None:
    if os.environ.get("CLIP2SCENE_REQUIRE_ROS") == "1":
        return MessageFactory.from_rclpy()
    try:
        return MessageFactory.from_rclpy()
    except Exception:  # noqa: BLE001 - no ROS 2 here: the rosbags backend is still tested
        return None


FACTORIES = {"rosbags": MessageFactory.from_rosbags(), "rclpy": _rclpy_factory()}


@pytest.fixture(scope="module")
def scans(data_dir: Path) -> dict[str, Scan]:
    out = {}
    for name, (path, dims, fields) in SCANS.items():
        pts = np.fromfile(data_dir / path, dtype=np.float32).reshape(-1, dims)
        out[name] = Scan(pts, fields)
    assert [len(s) for s in out.values()] == [34688, 124668, 131072]
    return out


@pytest.fixture(scope="module")
def scannet(data_dir: Path) -> Scan:
    pts = np.fromfile(data_dir / SCANNET, dtype=np.float32).reshape(-1, 6)
    return Scan(pts, ("x", "y", "z", "r", "g", "b"))


# ---- voxelize -------------------------------------------------------------------------------
def reference_voxelize(scan: Scan, cfg: VoxelConfig) -> dict[str, np.ndarray]:
    """The plain way: float64 everywhere, boolean masks, ``np.unique`` over coordinate rows."""
    vs = cfg.voxel_size_xyz
    xyz = scan.xyz.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        pc = (xyz / vs).astype(np.float32)
        grid = np.floor(pc)
        rel = xyz - (grid.astype(np.float64) + 0.5) * vs
    cols = []
    for name in cfg.features:
        if name == "xyz":
            cols.append(rel)
        elif name == "ones":
            cols.append(np.ones((len(scan), 1)))
        elif name == "rgb":
            cols.append(np.stack([scan.column(c) for c in "rgb"], 1).astype(np.float64) / 255.0)
        else:
            cols.append(scan.column(name).astype(np.float64)[:, None])
    feats = np.concatenate(cols, axis=1)
    keep = np.isfinite(xyz).all(1) & np.isfinite(feats).all(1)
    if cfg.point_range is not None:
        lo, hi = np.array(cfg.point_range[:3]), np.array(cfg.point_range[3:])
        with np.errstate(invalid="ignore"):
            keep &= ((xyz >= lo) & (xyz < hi)).all(1)
    g = grid[keep].astype(np.int64)
    uniq, inverse = np.unique(g, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    m = len(uniq)
    sums = np.zeros((m, feats.shape[1]))
    np.add.at(sums, inverse, feats[keep])
    counts = np.bincount(inverse, minlength=m).astype(np.float64)[:, None]
    coords = np.concatenate([np.zeros((m, 1), np.int64), uniq], 1).astype(np.int32)
    pcoords = np.concatenate([np.zeros((int(keep.sum()), 1), np.float32), pc[keep]], 1)
    return {"coords": coords, "features": (sums / counts).astype(np.float32),
            "inverse": inverse.astype(np.int64), "point_mask": keep, "point_coords": pcoords,
            "point_features": feats[keep].astype(np.float32)}


def assert_voxels_equal(scan: Scan, cfg: VoxelConfig) -> None:
    got, want = voxelize(scan, cfg), reference_voxelize(scan, cfg)
    for f in VOXELS_FIELDS:
        a, b = getattr(got, f), want[f]
        assert a.dtype == b.dtype and a.shape == b.shape, (f, a.dtype, b.dtype, a.shape, b.shape)
        assert np.array_equal(a, b), f"{f} differs for {cfg}"


@pytest.mark.parametrize("voxel_size", [0.1, 0.25, 0.05, (0.2, 0.2, 0.5)])
@pytest.mark.parametrize("point_range", [None, RANGE, ODD_RANGE])
def test_voxelize_equals_the_float64_unique_reference_on_real_scans(scans, voxel_size, point_range):
    for name, scan in scans.items():
        features = ("intensity", "xyz") if name == "semantickitti" else ("intensity",)
        assert_voxels_equal(scan, VoxelConfig(voxel_size=voxel_size, point_range=point_range,
                                              features=features))


def test_voxelize_equals_reference_with_nan_inf_and_colour(scans, scannet):
    pts = scans["nuscenes"].points.copy()
    pts[::7, 0] = np.nan
    pts[1::11, 2] = np.inf
    pts[3::17, 1] = -np.inf
    pts[2::13, 3] = np.nan           # a NaN feature drops the point
    scan = Scan(pts, scans["nuscenes"].fields)
    for rng in (None, ODD_RANGE):
        for feats in (("intensity",), ("xyz", "ones"), ("ring", "intensity", "xyz")):
            assert_voxels_equal(scan, VoxelConfig(voxel_size=0.1, point_range=rng, features=feats))
    assert_voxels_equal(scannet, VoxelConfig(voxel_size=0.02, features=("rgb", "xyz")))


def test_voxelize_points_on_voxel_and_range_boundaries():
    """Multiples of the voxel size and the range bounds, each ± one float32 ulp: the float32
    range test and float32 grid decide exactly as the float64 reference."""
    base = np.array([0.1 * k for k in range(-40, 41)] + list(ODD_RANGE), dtype=np.float32)
    vals = np.concatenate([base, np.nextafter(base, np.float32(np.inf)),
                           np.nextafter(base, np.float32(-np.inf))])
    rng = np.random.default_rng(0)
    blocks = [np.stack([rng.permutation(vals) for _ in range(3)], 1)]
    for a in range(3):   # one axis on the boundaries, the others well inside every range
        block = np.full((len(vals), 3), 0.05, np.float32)
        block[:, a] = vals
        blocks.append(block)
    xyz = np.concatenate(blocks)
    scan = Scan(np.concatenate([xyz, rng.random((len(xyz), 1), np.float32)], 1))
    for vs in (0.1, 0.3, (0.1, 0.05, 0.7)):
        for r in (None, ODD_RANGE, (-0.3, -0.3, -0.3, 0.3, 0.3, 0.3)):
            assert_voxels_equal(scan, VoxelConfig(voxel_size=vs, point_range=r))


def test_voxelize_wide_grid_takes_the_general_sort():
    """Coordinates spanning ±2^20 voxels on every axis leave no bits for the point index in
    the packed key: the general ``np.unique`` path gives the same result."""
    rng = np.random.default_rng(1)
    pts = rng.uniform(-1.04e6, 1.04e6, size=(5000, 4)).astype(np.float32)
    pts[:10, :3] = pts[10:20, :3]     # shared voxels
    assert_voxels_equal(Scan(pts), VoxelConfig(voxel_size=1.0))


# ---- cloud_to_scan ---------------------------------------------------------------------------
def xyzi_cloud(points: np.ndarray, factory: MessageFactory, names=("x", "y", "z", "intensity")):
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, factory) for i, n in enumerate(names)]
    return create_cloud(make_header(5, "lidar", factory), fields,
                        np.ascontiguousarray(points[:, :len(names)], dtype=np.float32),
                        msg_factory=factory)


def reference_cloud_to_scan(msg, extra: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(points, kept, non-finite feature count) the plain way."""
    pts = read_points(msg, ["x", "y", "z", extra])
    cols = np.stack([pts[n].astype(np.float32) for n in ("x", "y", "z", extra)], 1)
    kept = np.isfinite(cols[:, :3]).all(1)
    out = cols[kept]
    bad = ~np.isfinite(out[:, 3])
    out[bad, 3] = 0.0
    return out, kept, int(bad.sum())


@pytest.mark.parametrize("backend", ["rosbags", "rclpy"])
def test_cloud_to_scan_equals_reference_on_real_scans(scans, backend):
    factory = FACTORIES[backend]
    if factory is None:
        pytest.skip("rclpy is not installed")
    for name, scan in scans.items():
        pts = scan.points[:, :4].copy()
        if name == "nuscenes":
            pts[::5, 1] = np.nan
            pts[1::9, 2] = -np.inf
            pts[2::7, 3] = np.inf
        msg = xyzi_cloud(pts, factory)
        got, stats = cloud_to_scan(msg, ("intensity",))
        want, kept, n_bad = reference_cloud_to_scan(msg, "intensity")
        assert np.array_equal(got.points, want) and np.array_equal(stats.kept, kept)
        assert (stats.n_kept, stats.n_nonfinite, stats.n_feature_nonfinite) == \
            (int(kept.sum()), int((~kept).sum()), n_bad)
        # the float32 intensity is the Scan's own column: no second read of the message
        direct = kept_field_values(msg, stats, "intensity")
        via_scan = kept_field_values(msg, stats, "intensity", got)
        assert direct.dtype == via_scan.dtype == np.float32
        assert np.array_equal(direct, via_scan) and not via_scan.flags.writeable


def test_kept_field_values_ignores_the_scan_for_other_datatypes(scans):
    pts = scans["nuscenes"].points
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, FACTORIES["rosbags"]) for i, n in enumerate("xyz")]
    fields.append(make_point_field("intensity", 12, UINT8, 1, FACTORIES["rosbags"]))
    dt = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 3 + ["u1"],
                   "offsets": [0, 4, 8, 12], "itemsize": 16})
    arr = np.zeros(len(pts), dt)
    for i, n in enumerate("xyz"):
        arr[n] = pts[:, i]
    arr["intensity"] = pts[:, 3].astype(np.uint8)
    msg = create_cloud(make_header(0, "l", FACTORIES["rosbags"]), fields, arr,
                       msg_factory=FACTORIES["rosbags"])
    scan, stats = cloud_to_scan(msg)
    values = kept_field_values(msg, stats, "intensity", scan)
    assert values.dtype == np.uint8 and np.array_equal(values, arr["intensity"])


# ---- output cloud ------------------------------------------------------------------------------
def reference_output_bytes(xyz, intensity, labels, scores, palette, relevance=None) -> tuple:
    """The published compact layout spelled out: (fields, point_step, data bytes, is_dense)."""
    names = ["x", "y", "z"]
    formats = ["<f4"] * 3
    offsets = [0, 4, 8]
    off = 12
    if intensity is not None:
        names.append("intensity")
        formats.append(intensity.dtype.newbyteorder("<"))
        offsets.append(off)
        off += intensity.dtype.itemsize
    for name in ["label", "score", "rgb"] + (["relevance"] if relevance is not None else []):
        off = -(-off // 4) * 4
        names.append(name)
        formats.append("<u4" if name == "label" else "<f4")
        offsets.append(off)
        off += 4
    step = -(-off // 4) * 4
    arr = np.zeros(len(xyz), np.dtype({"names": names, "formats": formats, "offsets": offsets,
                                       "itemsize": step}))
    for i, c in enumerate("xyz"):
        arr[c] = xyz[:, i]
    if intensity is not None:
        arr["intensity"] = intensity
    arr["label"] = np.where(labels < 0, 65535, labels).astype(np.uint32)
    arr["score"] = scores
    arr["rgb"] = pack_rgb(colorize(labels, palette=palette))
    if relevance is not None:
        arr["relevance"] = relevance
    dense = all(np.isfinite(arr[n]).all() for n in names if arr.dtype.fields[n][0].kind == "f")
    return list(zip(names, offsets)), step, arr.tobytes(), bool(dense)


@pytest.mark.parametrize("backend", ["rosbags", "rclpy"])
def test_output_cloud_bytes_equal_the_published_layout_on_real_scans(scans, backend):
    factory = FACTORIES[backend]
    if factory is None:
        pytest.skip("rclpy is not installed")
    palette = palette_for(["car", "road", "vegetation", "person", "building"])
    rng = np.random.default_rng(2)
    for name, scan in scans.items():
        msg_in = xyzi_cloud(scan.points, factory)
        got_scan, stats = cloud_to_scan(msg_in, ("intensity",))
        n = len(got_scan)
        labels = rng.integers(-1, 8, n)     # 5..7: beyond the palette → unlabelled colour
        scores = rng.random(n, dtype=np.float32)
        relevance = rng.random(n, dtype=np.float32) if name == "semantickitti" else None
        if name == "rellis3d":
            scores[::101] = np.nan            # a NaN score makes the cloud not dense
        sources = {"labels": labels, "scores": scores}
        if relevance is not None:
            sources["relevance"] = relevance
        for intensity in (kept_field_values(msg_in, stats, "intensity", got_scan),
                          got_scan.column("intensity").astype(np.uint8), None):
            msg = output_cloud(msg_in.header, got_scan.xyz, output_columns(sources, palette, n),
                               intensity=intensity, msg_factory=factory)
            fields, step, data, dense = reference_output_bytes(
                got_scan.xyz, intensity, labels, scores, palette, relevance)
            assert [(f.name, f.offset, f.count) for f in msg.fields] == [(a, b, 1) for a, b in fields]
            assert (msg.height, msg.width, msg.point_step, msg.row_step, msg.is_bigendian) == \
                (1, n, step, step * n, False)
            assert msg.is_dense == dense == (name != "rellis3d")
            assert bytes(memoryview(msg.data)) == data
            if backend == "rclpy":
                assert isinstance(msg.data, array.array) and msg.data.typecode == "B"
            else:
                assert isinstance(msg.data, np.ndarray) and msg.data.dtype == np.uint8


def test_rclpy_cloud_data_is_handed_over_and_serialises():
    """The cloud's bytes are the array the converter filled (no copy), and rclpy's own
    serialiser reads them back (what the node publishes)."""
    factory = FACTORIES["rclpy"]
    if factory is None:
        pytest.skip("rclpy is not installed")
    from rclpy.serialization import deserialize_message, serialize_message

    value, view = factory.uint8_buffer(8)
    assert isinstance(value, array.array) and bytes(value) == bytes(8)
    view[:] = np.arange(8, dtype=np.uint8)
    cls = factory.get("PointCloud2")
    for checked in (False, True):   # rosidl's check_fields (Jazzy on): copying and keeping setters
        msg = cls(check_fields=checked) if "_check_fields" in getattr(cls, "__slots__", ()) else cls()
        assert factory.set_uint8(msg, "data", value) is msg and msg.data is value
    xyz = np.array([[1.0, 2.0, 3.0], [4.0, np.nan, 6.0]], np.float32)
    msg = output_cloud(None, xyz, [("label", np.array([3, 65535], np.uint32))], msg_factory=factory)
    back = deserialize_message(serialize_message(msg), type(msg))
    assert bytes(back.data) == bytes(msg.data) and back.point_step == 16 and not back.is_dense
    assert np.array_equal(read_points(back, ["label"])["label"], [3, 65535])


def test_create_cloud_bytes_equal_a_zeroed_structured_array(scans):
    """create_cloud fills the message's own buffer: same bytes as the plain structured array,
    big-endian and with trailing padding too."""
    pts = scans["nuscenes"].points
    for factory in (f for f in FACTORIES.values() if f is not None):
        for big in (False, True):
            fields = [make_point_field("x", 0, FLOAT32, 1, factory),
                      make_point_field("y", 4, FLOAT32, 1, factory),
                      make_point_field("z", 8, FLOAT32, 1, factory),
                      make_point_field("t", 16, FLOAT64, 1, factory)]
            end = ">" if big else "<"
            dt = np.dtype({"names": ["x", "y", "z", "t"], "formats": [end + "f4"] * 3 + [end + "f8"],
                           "offsets": [0, 4, 8, 16], "itemsize": 32})
            want = np.zeros(len(pts), dt)
            for i, c in enumerate("xyz"):
                want[c] = pts[:, i]
            want["t"] = pts[:, 4]
            msg = create_cloud(None, fields, np.stack([pts[:, 0], pts[:, 1], pts[:, 2],
                                                       pts[:, 4]], 1),
                               point_step=32, is_bigendian=big, msg_factory=factory)
            assert bytes(memoryview(msg.data)) == want.tobytes()
            assert msg.is_bigendian == big and msg.is_dense and msg.point_step == 32


def test_encoders_equal_colorize_and_where():
    labels = np.concatenate([np.arange(-1, 40), np.array([-1, -5, 0, 2**40, 2**63 - 1, 65534])]).astype(np.int64)
    for k in (0, 1, 5, 30):
        palette = palette_for([f"c{i}" for i in range(k)])
        want = pack_rgb(colorize(labels, palette=palette))
        assert np.array_equal(encode_rgb(labels, palette).view(np.uint32), want.view(np.uint32))
        small = labels.astype(np.int32)   # wraps the huge labels, as colorize sees them too
        assert np.array_equal(encode_rgb(small, palette).view(np.uint32),
                              pack_rgb(colorize(small, palette=palette)).view(np.uint32))
    ok = labels[(labels >= -1) & (labels < 65535)]
    assert np.array_equal(encode_labels(ok), np.where(ok < 0, 65535, ok).astype(np.uint32))
    assert encode_labels(ok).dtype == np.uint32
    assert np.array_equal(encode_labels(np.array([0, 7, 65534], np.uint16)), [0, 7, 65534])
