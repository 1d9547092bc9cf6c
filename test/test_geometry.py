"""Camera models, projection and rigid transforms, checked on the real nuScenes calibrations.

Reference implementations: OpenCV's ``cv2.projectPoints`` / ``cv2.fisheye.projectPoints``.
Point counts inside each camera come from test/data/README.md (scene-0061, depth > 1 m).
"""
from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest

from clip2scene_core.errors import CalibrationError, InvalidPointCloudError, TransformError
from clip2scene_core.geometry import (Projection, apply_transform, interpolate_transform_at,
                                      interpolate_transforms, invert_transform,
                                      matrix_to_quat_wxyz, matrix_to_quat_xyzw,
                                      max_valid_radius, project_points, project_to_cameras,
                                      quat_wxyz_to_matrix, quat_xyzw_to_matrix,
                                      transform_from_quat_wxyz, transform_from_quat_xyzw,
                                      wxyz_to_xyzw)
from clip2scene_core.types import Calibration, CameraModel

SCENE61 = "nuscenes/mmdet3d_demo_scene-0061"
CAMERAS = ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT",
           "CAM_BACK_RIGHT")
README_COUNTS = dict(zip(CAMERAS, (3067, 3704, 3079, 4826, 4097, 3379)))

# Realistic lens coefficients: RELLIS-3D's Basler camera (plumb_bob), a typical OpenCV
# rational calibration of a wide lens (k1 ≈ k4), and a typical Kalibr equidistant fisheye.
PLUMB_BOB = [-0.134313, -0.025905, 0.002181, 0.00084, 0.0]
RATIONAL = [1.8, 0.45, 0.0005, -0.0003, 0.012, 2.1, 0.8, 0.05]
EQUIDISTANT = [-0.0132, 0.0214, -0.0273, 0.0101]


@pytest.fixture(scope="module")
def scene61(data_dir):
    root = data_dir / SCENE61
    info = pickle.loads((root / "n015-2018-07-24-11-22-45+0800.pkl").read_bytes())["data_list"][0]
    pts = np.fromfile(root / info["lidar_points"]["lidar_path"], dtype=np.float32).reshape(-1, 5)
    cams = {c: (np.asarray(info["images"][c]["cam2img"]), np.asarray(info["images"][c]["lidar2cam"]))
            for c in CAMERAS}
    return pts[:, :3], cams


def _calib(K, T, D=(), model="none"):
    return Calibration(CameraModel(1600, 900, K, list(D), model), T)


def _camera_frame_points(xyz, T, min_depth=1.0):
    pc = xyz.astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    return pc, pc[:, 2] >= min_depth


@pytest.mark.parametrize("camera", CAMERAS)
def test_pinhole_counts_match_readme(scene61, camera):
    xyz, cams = scene61
    K, T = cams[camera]
    proj = project_points(xyz, _calib(K, T), min_depth=1.0)
    assert isinstance(proj, Projection)
    assert proj.uv.shape == (len(xyz), 2) and proj.depth.shape == (len(xyz),)
    assert proj.valid.dtype == bool
    assert int(proj.valid.sum()) == README_COUNTS[camera]
    assert np.all(proj.depth[proj.valid] >= 1.0)
    uv = proj.uv[proj.valid]
    assert np.all((uv >= 0) & (uv < [1600, 900]))


@pytest.mark.parametrize("model,D", [("plumb_bob", PLUMB_BOB), ("rational_polynomial", RATIONAL)])
@pytest.mark.parametrize("camera", CAMERAS)
def test_matches_cv2_project_points(scene61, camera, model, D):
    xyz, cams = scene61
    K, T = cams[camera]
    proj = project_points(xyz, _calib(K, T, D, model), min_depth=1.0)
    pc, front = _camera_frame_points(xyz, T)
    ref, _ = cv2.projectPoints(pc[front].reshape(-1, 1, 3), np.zeros(3), np.zeros(3), K,
                               np.asarray(D, dtype=np.float64))
    ref_full = np.full((len(xyz), 2), np.nan)
    ref_full[front] = ref.reshape(-1, 2)
    assert proj.valid.sum() > 1000
    np.testing.assert_allclose(proj.uv[proj.valid], ref_full[proj.valid], rtol=0, atol=1e-6)


@pytest.mark.parametrize("camera", CAMERAS)
def test_matches_cv2_fisheye(scene61, camera):
    xyz, cams = scene61
    K, T = cams[camera]
    proj = project_points(xyz, _calib(K, T, EQUIDISTANT, "equidistant"), min_depth=1.0)
    pc, front = _camera_frame_points(xyz, T)
    ref, _ = cv2.fisheye.projectPoints(pc[front].reshape(-1, 1, 3), np.zeros(3), np.zeros(3), K,
                                       np.asarray(EQUIDISTANT, dtype=np.float64))
    ref_full = np.full((len(xyz), 2), np.nan)
    ref_full[front] = ref.reshape(-1, 2)
    assert proj.valid.sum() > 1000
    np.testing.assert_allclose(proj.uv[proj.valid], ref_full[proj.valid], rtol=0, atol=1e-6)


def test_plumb_bob_fold_back_is_invalid(scene61):
    """Barrel distortion folds back at r ≈ 1.28: OpenCV maps those far off-axis points into the
    wide CAM_BACK image anyway; they must not count as seen."""
    xyz, cams = scene61
    K, T = cams["CAM_BACK"]
    calib = _calib(K, T, PLUMB_BOB, "plumb_bob")
    r_max = max_valid_radius(calib.camera)
    k1, k2 = PLUMB_BOB[0], PLUMB_BOB[1]
    # d/dr [r (1 + k1 r² + k2 r⁴)] = 1 + 3 k1 r² + 5 k2 r⁴ changes sign at r_max
    assert 1 + 3 * k1 * (0.99 * r_max) ** 2 + 5 * k2 * (0.99 * r_max) ** 4 > 0
    assert 1 + 3 * k1 * (1.01 * r_max) ** 2 + 5 * k2 * (1.01 * r_max) ** 4 < 0
    proj = project_points(xyz, calib, min_depth=1.0)
    pc, front = _camera_frame_points(xyz, T)
    ref, _ = cv2.projectPoints(pc[front].reshape(-1, 1, 3), np.zeros(3), np.zeros(3), K,
                               np.asarray(PLUMB_BOB))
    ref = ref.reshape(-1, 2)
    cv_inside = np.zeros(len(xyz), bool)
    cv_inside[front] = np.all((ref >= 0) & (ref < [1600, 900]), axis=1)
    folded = cv_inside & ~proj.valid
    assert folded.sum() > 100
    radius = np.hypot(pc[:, 0] / pc[:, 2], pc[:, 1] / pc[:, 2])
    assert np.all(radius[folded] >= r_max)
    assert np.all(radius[proj.valid] < r_max)


def test_equidistant_fold_back_is_invalid(scene61):
    xyz, cams = scene61
    K, T = cams["CAM_BACK"]
    strong = [-0.6, 0.05, 0.0, 0.0]   # θ_d = θ(1 − 0.6θ² + 0.05θ⁴) peaks near θ ≈ 47°
    calib = _calib(K, T, strong, "equidistant")
    theta_max = np.arctan(max_valid_radius(calib.camera))
    assert 0.7 < theta_max < 0.9
    proj = project_points(xyz, calib, min_depth=1.0)
    pc, _ = _camera_frame_points(xyz, T)
    theta = np.arctan2(np.hypot(pc[:, 0], pc[:, 1]), pc[:, 2])
    assert proj.valid.sum() > 100
    assert np.all(theta[proj.valid] < theta_max)


def test_project_to_cameras(scene61):
    xyz, cams = scene61
    calibs = [_calib(*cams[c]) for c in CAMERAS]
    projs = project_to_cameras(xyz, calibs, min_depth=1.0)
    assert [int(p.valid.sum()) for p in projs] == [README_COUNTS[c] for c in CAMERAS]
    single = project_points(xyz, calibs[2], min_depth=1.0)
    np.testing.assert_array_equal(projs[2].valid, single.valid)
    assert project_to_cameras(xyz, [], min_depth=1.0) == []


def test_non_finite_points_are_invalid_not_errors(scene61):
    xyz, cams = scene61
    pts = xyz[:2000].astype(np.float64).copy()
    pts[::3, 0] = np.nan
    pts[1::7, 2] = np.inf
    pts[2::11, 1] = -np.inf
    bad = ~np.all(np.isfinite(pts), axis=1)
    calib = _calib(*cams["CAM_FRONT"], D=PLUMB_BOB, model="plumb_bob")
    proj = project_points(pts, calib)
    assert not proj.valid[bad].any()
    clean = project_points(xyz[:2000], calib)
    np.testing.assert_array_equal(proj.valid[~bad], clean.valid[~bad])
    empty = project_points(np.zeros((0, 3)), calib)
    assert empty.uv.shape == (0, 2) and empty.valid.shape == (0,)


def test_min_depth_and_wide_input(scene61):
    xyz, cams = scene61
    calib = _calib(*cams["CAM_FRONT"])
    near = project_points(xyz, calib, min_depth=0.5)
    far = project_points(xyz, calib, min_depth=20.0)
    assert far.valid.sum() < near.valid.sum()
    assert np.all(far.depth[far.valid] >= 20.0)
    # extra columns (intensity, ring) are ignored
    pts5 = np.c_[xyz, np.ones((len(xyz), 2), np.float32)]
    np.testing.assert_array_equal(project_points(pts5, calib).valid, near.valid)


def test_bad_inputs_raise_clear_errors(scene61):
    xyz, cams = scene61
    K, T = cams["CAM_FRONT"]
    with pytest.raises(InvalidPointCloudError):
        project_points(xyz[:, :2], _calib(K, T))
    with pytest.raises(InvalidPointCloudError):
        project_points(xyz.reshape(-1), _calib(K, T))
    bad_K = K.copy()
    bad_K[2] = [0.0, 0.5, 1.0]
    with pytest.raises(CalibrationError, match="last row"):
        project_points(xyz, _calib(bad_K, T))
    zero_f = K.copy()
    zero_f[0, 0] = 0.0
    with pytest.raises(CalibrationError):
        _calib(zero_f, T)
    with pytest.raises(CalibrationError, match="coefficients"):
        project_points(xyz, _calib(K, T, [0.1] * 7, "plumb_bob"))
    with pytest.raises(CalibrationError):
        project_points(xyz, _calib(K, T, [np.nan, 0, 0, 0, 0], "plumb_bob"))
    with pytest.raises(CalibrationError):
        project_points(xyz, _calib(K, T), min_depth=-1.0)
    # shorter D means zeros for the rest; trailing zeros beyond the model are tolerated
    a = project_points(xyz, _calib(K, T, PLUMB_BOB[:4], "plumb_bob"))
    b = project_points(xyz, _calib(K, T, PLUMB_BOB[:4] + [0.0] * 10, "plumb_bob"))
    np.testing.assert_array_equal(a.uv, b.uv)


# ---------------------------------------------------------------- transforms

@pytest.fixture(scope="module")
def nuscenes_tables(data_dir):
    folder = data_dir / "nuscenes/dororo99_v1.0-extract_3samples/v1.0-extract-subset"
    calib = json.loads((folder / "calibrated_sensor.json").read_text())
    ego = json.loads((folder / "ego_pose.json").read_text())
    return calib, ego


def test_quaternion_round_trips_on_real_rotations(nuscenes_tables):
    calib, ego = nuscenes_tables
    quats = [np.asarray(r["rotation"]) for r in calib + ego]
    assert len(quats) == 35
    for q in quats:
        R = quat_wxyz_to_matrix(q)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
        back = matrix_to_quat_wxyz(R)
        q = q / np.linalg.norm(q)
        np.testing.assert_allclose(back, q if q[0] >= 0 else -q, atol=1e-9)
        np.testing.assert_allclose(quat_xyzw_to_matrix(wxyz_to_xyzw(q)), R, atol=1e-12)
        np.testing.assert_allclose(matrix_to_quat_xyzw(R), wxyz_to_xyzw(back), atol=1e-12)
    # batch conversion agrees with one-at-a-time
    batch = quat_wxyz_to_matrix(np.stack(quats))
    np.testing.assert_allclose(batch[5], quat_wxyz_to_matrix(quats[5]), atol=1e-15)


def test_quaternion_conventions_are_not_swapped():
    # 90° about z: (w, x, y, z) = (cos 45°, 0, 0, sin 45°) sends x to y
    q_wxyz = np.array([np.sqrt(0.5), 0.0, 0.0, np.sqrt(0.5)])
    np.testing.assert_allclose(quat_wxyz_to_matrix(q_wxyz) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    q_xyzw = np.array([0.0, 0.0, np.sqrt(0.5), np.sqrt(0.5)])
    np.testing.assert_allclose(quat_xyzw_to_matrix(q_xyzw) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    T = transform_from_quat_xyzw([1.0, 2.0, 3.0], q_xyzw)
    np.testing.assert_allclose(T, transform_from_quat_wxyz([1.0, 2.0, 3.0], q_wxyz))
    for R in (np.diag([1.0, -1.0, -1.0]), np.diag([-1.0, 1.0, -1.0]), np.diag([-1.0, -1.0, 1.0])):
        np.testing.assert_allclose(quat_wxyz_to_matrix(matrix_to_quat_wxyz(R)), R, atol=1e-12)
    with pytest.raises(TransformError):
        quat_wxyz_to_matrix([0.0, 0.0, 0.0, 0.0])
    with pytest.raises(TransformError):
        matrix_to_quat_wxyz(np.diag([1.0, 1.0, -1.0]))


def test_rigid_inverse_on_real_poses(nuscenes_tables):
    _, ego = nuscenes_tables
    for r in ego:
        T = transform_from_quat_wxyz(r["translation"], r["rotation"])
        np.testing.assert_allclose(T @ invert_transform(T), np.eye(4), atol=1e-9)
        np.testing.assert_allclose(invert_transform(T), np.linalg.inv(T), atol=1e-9)
    pts = np.array([[1.0, 2.0, 3.0], [-4.0, 0.5, 10.0]])
    T = transform_from_quat_wxyz(ego[0]["translation"], ego[0]["rotation"])
    np.testing.assert_allclose(apply_transform(invert_transform(T), apply_transform(T, pts)), pts,
                               atol=1e-9)


def test_interpolation_between_real_ego_poses(nuscenes_tables):
    _, ego = nuscenes_tables
    # the two LIDAR_TOP key-frame poses of scene-0523, half a second apart
    by_stamp = {r["timestamp"]: r for r in ego}
    r0, r1 = by_stamp[1535639716699138], by_stamp[1535639717200102]
    T0 = transform_from_quat_wxyz(r0["translation"], r0["rotation"])
    T1 = transform_from_quat_wxyz(r1["translation"], r1["rotation"])
    np.testing.assert_allclose(interpolate_transforms(T0, T1, 0.0), T0, atol=1e-12)
    np.testing.assert_allclose(interpolate_transforms(T0, T1, 1.0), T1, atol=1e-12)
    mid = interpolate_transforms(T0, T1, 0.5)
    np.testing.assert_allclose(mid[:3, 3], (T0[:3, 3] + T1[:3, 3]) / 2, atol=1e-12)

    def angle(Ra, Rb):
        return np.arccos(np.clip((np.trace(Ra.T @ Rb) - 1) / 2, -1, 1))

    total = angle(T0[:3, :3], T1[:3, :3])
    assert total > 1e-3     # the car turns a little in this half second
    assert angle(T0[:3, :3], mid[:3, :3]) == pytest.approx(total / 2, rel=1e-6)
    at = interpolate_transform_at(r0["timestamp"], T0, r1["timestamp"], T1,
                                  (r0["timestamp"] + r1["timestamp"]) / 2)
    np.testing.assert_allclose(at, mid, atol=1e-9)
    # order of the two stamped poses does not matter
    swapped = interpolate_transform_at(r1["timestamp"], T1, r0["timestamp"], T0,
                                       (r0["timestamp"] + r1["timestamp"]) / 2)
    np.testing.assert_allclose(swapped, mid, atol=1e-9)
    with pytest.raises(TransformError):
        interpolate_transforms(T0, T1, 1.5)
    with pytest.raises(TransformError):
        interpolate_transform_at(r0["timestamp"], T0, r1["timestamp"], T1, r1["timestamp"] + 1)
