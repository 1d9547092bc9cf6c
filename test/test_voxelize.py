"""voxelize() on real scans: grid convention, inverse map, means, dropping, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip2scene_core.config import from_dict
from clip2scene_core.errors import ConfigError, EmptyPointCloudError, InvalidPointCloudError
from clip2scene_core.types import Scan
from clip2scene_core.voxelize import VoxelConfig, Voxels, voxelize

NUSC = "nuscenes/mmdet3d_demo_scene-0061/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
KITTI = "semantickitti/squeezesegv3_sample_data/sequences/00/velodyne/000000.bin"
SCANNET = "scannet/mmdet3d_demo/scene0000_00.bin"


@pytest.fixture(scope="module")
def nusc(data_dir: Path) -> Scan:
    pts = np.fromfile(data_dir / NUSC, dtype=np.float32).reshape(-1, 5)
    return Scan(pts, ("x", "y", "z", "intensity", "ring"))


@pytest.fixture(scope="module")
def kitti(data_dir: Path) -> Scan:
    pts = np.fromfile(data_dir / KITTI, dtype=np.float32).reshape(-1, 4)
    return Scan(pts, ("x", "y", "z", "remission"))


@pytest.fixture(scope="module")
def scannet(data_dir: Path) -> Scan:
    pts = np.fromfile(data_dir / SCANNET, dtype=np.float32).reshape(-1, 6)
    return Scan(pts, ("x", "y", "z", "r", "g", "b"))


def check_invariants(v: Voxels, scans: list[Scan], cfg: VoxelConfig) -> None:
    """Every structural promise of Voxels, recomputed independently."""
    m = len(v.coords)
    assert v.coords.dtype == np.int32 and v.coords.shape == (m, 4)
    order = np.lexsort(v.coords.T[::-1])
    assert np.array_equal(order, np.arange(m)), "coords sorted lexicographically (b, x, y, z)"
    assert len(np.unique(v.coords, axis=0)) == m, "coords unique"
    assert v.inverse.dtype == np.int64 and v.inverse.min() >= 0 and v.inverse.max() == m - 1
    assert len(np.unique(v.inverse)) == m, "every voxel holds at least one point"
    xyz = np.concatenate([s.xyz for s in scans])[v.point_mask]
    vs = cfg.voxel_size_xyz
    # the kept point lies inside the voxel its inverse points to (float64 check, 1e-5 slack)
    lo = v.coords[v.inverse, 1:] * vs
    assert np.all(xyz >= lo - 1e-5) and np.all(xyz < lo + vs + 1e-5)
    assert np.array_equal(np.floor(v.point_coords[:, 1:]).astype(np.int32), v.coords[v.inverse, 1:])
    assert np.array_equal(v.point_coords[:, 0].astype(np.int32), v.coords[v.inverse, 0])
    # features are per-voxel means of the point features
    sums = np.zeros((m, v.features.shape[1]))
    np.add.at(sums, v.inverse, v.point_features.astype(np.float64))
    cnt = np.bincount(v.inverse, minlength=m)[:, None]
    np.testing.assert_allclose(v.features, sums / cnt, rtol=1e-5, atol=1e-5)


def test_real_nuscenes_scan(nusc: Scan) -> None:
    cfg = VoxelConfig(voxel_size=0.1, features=("intensity",))
    v = voxelize(nusc, cfg)
    check_invariants(v, [nusc], cfg)
    assert v.point_mask.all() and v.num_points == len(nusc)
    assert 1000 < len(v.coords) < len(nusc)
    assert (v.coords[:, 1:] < 0).any(), "the sweep surrounds the sensor: negative coords"
    np.testing.assert_array_equal(v.point_features[:, 0], nusc.column("intensity"))


def test_negative_coordinates_floor() -> None:
    pts = np.array([[-0.05, 0.05, -0.15, 1.0], [-0.10, 0.0, 0.0, 2.0], [0.0, -0.0001, 0.0999, 3.0]], np.float32)
    v = voxelize(Scan(pts), VoxelConfig(voxel_size=0.1))
    got = v.coords[v.inverse, 1:]
    assert got.tolist() == [[-1, 0, -2], [-1, 0, 0], [0, -1, 0]]
    assert len(v.coords) == 3 and v.features[v.inverse, 0].tolist() == [1.0, 2.0, 3.0]


def test_deterministic_and_order_independent(kitti: Scan) -> None:
    cfg = VoxelConfig(voxel_size=0.05, features=("remission", "xyz"))
    a = voxelize(kitti, cfg)
    b = voxelize(kitti, cfg)
    for f in ("coords", "features", "inverse", "point_mask", "point_coords", "point_features"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    perm = np.random.default_rng(0).permutation(len(kitti))
    c = voxelize(Scan(kitti.points[perm], kitti.fields), cfg)
    assert np.array_equal(a.coords, c.coords)
    np.testing.assert_allclose(a.features, c.features, rtol=1e-5, atol=1e-6)
    assert np.array_equal(a.inverse[perm], c.inverse)
    check_invariants(a, [kitti], cfg)


def test_xyz_feature_is_relative_to_voxel_centre(kitti: Scan) -> None:
    cfg = VoxelConfig(voxel_size=0.2, features=("xyz", "ones"))
    v = voxelize(kitti, cfg)
    rel = v.point_features[:, :3]
    assert np.all(np.abs(rel) <= 0.1 + 1e-5)
    centre = (v.coords[v.inverse, 1:] + 0.5) * 0.2
    np.testing.assert_allclose(rel + centre, kitti.xyz, atol=1e-4)
    assert np.all(v.features[:, 3] == 1.0)
    assert VoxelConfig(features=("xyz", "ones", "rgb")).num_channels == 7


def test_rgb_from_colour_fields_and_packed(scannet: Scan) -> None:
    cfg = VoxelConfig(voxel_size=0.05, features=("rgb",))
    v = voxelize(scannet, cfg)
    check_invariants(v, [scannet], cfg)
    np.testing.assert_allclose(v.point_features, scannet.points[:, 3:6] / 255.0, rtol=1e-6)
    assert v.features.min() >= 0 and v.features.max() <= 1
    rgb = scannet.points[:, 3:6].astype(np.uint32)
    packed = ((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]).view(np.float32)
    s2 = Scan(np.concatenate([scannet.xyz, packed[:, None]], 1), ("x", "y", "z", "rgb"))
    v2 = voxelize(s2, cfg)
    np.testing.assert_allclose(v2.features, v.features, rtol=1e-6)


def test_nan_inf_and_out_of_range_are_dropped(nusc: Scan) -> None:
    pts = nusc.points.copy()
    pts[::7, 0] = np.nan
    pts[1::11, 2] = np.inf
    pts[2::13, 3] = np.nan            # a NaN in a used feature column drops the point too
    scan = Scan(pts, nusc.fields)
    cfg = VoxelConfig(voxel_size=0.1, point_range=(-20.0, -20.0, -3.0, 20.0, 20.0, 2.0))
    v = voxelize(scan, cfg)
    xyz = pts[:, :3]
    finite = np.isfinite(pts[:, :4]).all(1)
    with np.errstate(invalid="ignore"):
        inside = np.all((xyz >= [-20, -20, -3]) & (xyz < [20, 20, 2]), axis=1)
    np.testing.assert_array_equal(v.point_mask, finite & inside)
    assert np.isfinite(v.features).all() and np.isfinite(v.point_coords).all()
    check_invariants(v, [scan], cfg)


def test_batch_of_two_scans(nusc: Scan, kitti: Scan) -> None:
    cfg = VoxelConfig(voxel_size=0.1, features=("ones",))
    one_a, one_b = voxelize(nusc, cfg), voxelize(kitti, cfg)
    v = voxelize([nusc, kitti], cfg)
    check_invariants(v, [nusc, kitti], cfg)
    assert v.batch_size == 2
    na = len(one_a.coords)
    assert np.array_equal(v.coords[:na, 1:], one_a.coords[:, 1:]) and (v.coords[:na, 0] == 0).all()
    assert np.array_equal(v.coords[na:, 1:], one_b.coords[:, 1:]) and (v.coords[na:, 0] == 1).all()
    assert np.array_equal(v.inverse[len(nusc):], one_b.inverse + na)


def test_anisotropic_voxels(kitti: Scan) -> None:
    cfg = VoxelConfig(voxel_size=(0.2, 0.2, 0.5), features=("remission",))
    v = voxelize(kitti, cfg)
    check_invariants(v, [kitti], cfg)


def test_empty_inputs_raise(nusc: Scan) -> None:
    cfg = VoxelConfig(voxel_size=0.1)
    with pytest.raises(EmptyPointCloudError):
        voxelize(Scan(np.zeros((0, 4), np.float32)), cfg)
    with pytest.raises(EmptyPointCloudError):
        voxelize([], cfg)
    nan = Scan(np.full((10, 4), np.nan, np.float32))
    with pytest.raises(EmptyPointCloudError, match="no valid point"):
        voxelize(nan, cfg)
    far = VoxelConfig(voxel_size=0.1, point_range=(500, 500, 500, 600, 600, 600), features=("intensity",))
    with pytest.raises(EmptyPointCloudError, match="scan 1"):
        voxelize([Scan(np.array([[550, 550, 550, 1]], np.float32)), nusc], far)


def test_unknown_feature_names_available_fields(nusc: Scan) -> None:
    with pytest.raises(InvalidPointCloudError, match="available.*ring"):
        voxelize(nusc, VoxelConfig(features=("reflectivity",)))
    with pytest.raises(InvalidPointCloudError, match="rgb"):
        voxelize(nusc, VoxelConfig(features=("rgb",)))
    with pytest.raises(InvalidPointCloudError):
        voxelize([nusc.points], VoxelConfig())   # type: ignore[list-item]


def test_far_points_need_a_range() -> None:
    pts = np.array([[0, 0, 0, 1], [1e6, 0, 0, 1]], np.float32)
    with pytest.raises(InvalidPointCloudError, match="point_range"):
        voxelize(Scan(pts), VoxelConfig(voxel_size=0.01))
    v = voxelize(Scan(pts), VoxelConfig(voxel_size=0.01, point_range=(-10, -10, -10, 10, 10, 10)))
    assert v.point_mask.tolist() == [True, False]


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        VoxelConfig(voxel_size=0.0)
    with pytest.raises(ConfigError):
        VoxelConfig(point_range=(1, 0, 0, 0, 1, 1))
    with pytest.raises(ConfigError):
        VoxelConfig(features=())
    with pytest.raises(ConfigError):
        VoxelConfig(voxel_size=(0.1, 0.2))      # type: ignore[arg-type]
    cfg = from_dict(VoxelConfig, {"voxel_size": 0.05, "features": ["rgb", "ones"],
                                  "point_range": [-1, -1, -1, 1, 1, 1]})
    assert cfg.features == ("rgb", "ones") and cfg.point_range == (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(VoxelConfig, {"voxel": 0.1})
