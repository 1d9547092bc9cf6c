"""Dataset readers on the real samples of test/data (numbers quoted from test/data/README.md)."""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from clip2scene_core.datasets import (CLASS_NAMES, NUSCENES16_CLASSES, READERS, RELLIS3D_CLASSES,
                                      RELLIS3D_NOTEBOOK_DISTORTION, SCANNET20_CLASSES, DatasetReader,
                                      SEMANTICKITTI19_CLASSES, NuScenesInfoReader,
                                      NuScenesReader, Rellis3DReader, Sample, ScanNetReader,
                                      SemanticKittiReader, kitti_camera_calibration,
                                      parse_kitti_calib)
from clip2scene_core.datasets.base import load_label_array, load_points_bin
from clip2scene_core.errors import (CalibrationError, Clip2SceneError, ConfigError,
                                    InvalidPointCloudError)
from clip2scene_core.geometry import (invert_transform, project_points,
                                      transform_from_quat_wxyz)
from clip2scene_core.types import Scan

DORORO = "nuscenes/dororo99_v1.0-extract_3samples"
DORORO_TABLES = "v1.0-extract-subset"
LIDARSEG = "nuscenes/mmdet3d_tests_lidarseg"
SCENE61 = "nuscenes/mmdet3d_demo_scene-0061"
SKITTI = "semantickitti/squeezesegv3_sample_data"
SCANNET = "scannet/mmdet3d_2020_full_scene"
SCANNET_INFO = "scannet/mmdet3d_pr748_multiview/scannet_infos.pkl"
RELLIS = "rellis3d/utils_example"


def _mirror(src: Path, dst: Path) -> Path:
    """A tree of symlinks to the real files, so a test can remove or add files safely."""
    for p in src.rglob("*"):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(p.resolve())
    return dst


# ---------------------------------------------------------------- class lists

def test_class_lists_follow_the_paper_order():
    assert NUSCENES16_CLASSES == (
        "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
        "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk",
        "terrain", "manmade", "vegetation")
    assert len(SEMANTICKITTI19_CLASSES) == 19
    assert SEMANTICKITTI19_CLASSES[:5] == ("car", "bicycle", "motorcycle", "truck", "other-vehicle")
    assert SEMANTICKITTI19_CLASSES[-1] == "traffic-sign"
    assert len(SCANNET20_CLASSES) == 20 and SCANNET20_CLASSES[0] == "wall"
    assert SCANNET20_CLASSES[-1] == "otherfurniture"
    assert set(CLASS_NAMES) >= {"nuscenes16", "semantickitti19", "scannet20"}
    for names in CLASS_NAMES.values():
        assert len(set(names)) == len(names)


# ---------------------------------------------------------------- nuScenes devkit layout

@pytest.fixture(scope="module")
def dororo(data_dir):
    return NuScenesReader(data_dir / DORORO, DORORO_TABLES, num_sweeps=3)


def test_nuscenes_devkit_frames(dororo, data_dir):
    assert len(dororo) == 3
    assert dororo.tokens == ["ce03b6f0c1d2455aa18f6275917485bc", "ea43c86a960344f09d3b3ab2035aced8",
                             "b5989651183643369174912bc5641d3b"]
    counts = []
    for sample, n in zip(dororo, (34400, 34816, 34560)):
        assert len(sample.scan) == n
        assert isinstance(sample, Sample)
        assert sample.scan.fields == ("x", "y", "z", "intensity", "ring")
        assert sample.vocabulary_name == "nuscenes16"
        assert sample.class_names == NUSCENES16_CLASSES
        assert sample.labels is None                 # no lidarseg in this extract
        assert sample.sweeps == []                   # prev records are not in the extract
        assert sample.lidar_to_world.shape == (4, 4)
        assert sorted(c.name for c in sample.cameras) == sorted(
            ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT",
             "CAM_BACK_RIGHT"])
        for cam in sample.cameras:
            assert cam.image.shape == (900, 1600, 3) and cam.image.dtype == np.uint8
            assert cam.stamp_ns > 0
            counts.append(int(project_points(sample.scan.xyz, cam.calibration, 1.0).valid.sum()))
    assert [s.scene for s in (dororo[0], dororo[1], dororo[2])] == ["scene-0523", "scene-0523",
                                                                    "scene-0916"]
    assert dororo.sample_scenes() == ["scene-0523", "scene-0523", "scene-0916"]
    # README: "about 2.5k-5k points inside each 1600x900 image, for all 18 sample/camera pairs"
    assert len(counts) == 18
    assert min(counts) > 2300 and max(counts) < 5500


def test_nuscenes_devkit_camera_chain_uses_both_ego_poses(dororo, data_dir):
    """lidar→cam must go through ego(t_lidar)→global→ego(t_cam): close to the static
    calibrated_sensor chain (the car moves < 1 m in ~40 ms) but not equal to it."""
    folder = data_dir / DORORO / DORORO_TABLES
    calib = {r["token"]: r for r in json.loads((folder / "calibrated_sensor.json").read_text())}
    sd = {r["token"]: r for r in json.loads((folder / "sample_data.json").read_text())}
    sample = dororo[0]
    lidar_sd = [r for r in sd.values() if r["sample_token"] == sample.token
                and "LIDAR_TOP" in r["filename"]][0]
    lc = calib[lidar_sd["calibrated_sensor_token"]]
    T_lidar = transform_from_quat_wxyz(lc["translation"], lc["rotation"])
    for cam in sample.cameras:
        cam_sd = [r for r in sd.values() if r["sample_token"] == sample.token
                  and f"/{cam.name}/" in r["filename"]][0]
        cc = calib[cam_sd["calibrated_sensor_token"]]
        static = invert_transform(transform_from_quat_wxyz(cc["translation"], cc["rotation"])) @ T_lidar
        T = cam.calibration.lidar_to_camera
        shift = np.linalg.norm(T[:3, 3] - static[:3, 3])
        assert 1e-4 < shift < 1.0
        cos = (np.trace(T[:3, :3].T @ static[:3, :3]) - 1) / 2
        assert np.degrees(np.arccos(np.clip(cos, -1, 1))) < 1.0
        np.testing.assert_allclose(cam.calibration.camera.K, cc["camera_intrinsic"])


def test_nuscenes_devkit_is_lazy_and_names_missing_files(data_dir, tmp_path):
    root = _mirror(data_dir / DORORO, tmp_path / "nus")
    reader = NuScenesReader(root, DORORO_TABLES)
    lidar = sorted((root / "samples/LIDAR_TOP").glob("*1535639717200102.pcd.bin"))[0]
    lidar.unlink()                      # after construction: the reader must not have read it
    assert len(reader) == 3
    assert len(reader[0].scan) == 34400
    with pytest.raises(FileNotFoundError, match=re.escape(lidar.name)):
        reader[1]
    image = sorted((root / "samples/CAM_FRONT").glob("n015*.jpg"))[0]
    image.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(image.name)):
        reader[2]
    skipping = NuScenesReader(root, DORORO_TABLES, skip_missing_images=True)
    assert [c.name for c in skipping[2].cameras if c.name == "CAM_FRONT"] == []
    with pytest.raises(IndexError):
        reader[3]
    assert skipping[-1].token == skipping.tokens[2]


def test_nuscenes_devkit_lidarseg_path_and_count_check(data_dir, tmp_path):
    root = _mirror(data_dir / DORORO, tmp_path / "nus")
    reader = NuScenesReader(root, DORORO_TABLES)
    sample_token = reader.tokens[0]
    sd = json.loads((root / DORORO_TABLES / "sample_data.json").read_text())
    lidar_token = [r["token"] for r in sd if r["sample_token"] == sample_token
                   and "LIDAR_TOP" in r["filename"]][0]
    seg = root / "lidarseg" / DORORO_TABLES / f"{lidar_token}_lidarseg.bin"
    seg.parent.mkdir(parents=True)
    # the only real lidarseg file has 40 labels: a mismatch for this 34400-point scan
    shutil.copy(data_dir / LIDARSEG / "lidarseg/v1.0-trainval/5f6c1e0a0c3b444b97e78d2aa3fa34d2_lidarseg.bin", seg)
    with pytest.raises(InvalidPointCloudError, match="40 labels for 34400 points"):
        reader[0]
    assert reader[1].labels is None


def test_nuscenes_devkit_missing_table(data_dir, tmp_path):
    root = _mirror(data_dir / DORORO, tmp_path / "nus")
    (root / DORORO_TABLES / "ego_pose.json").unlink()
    with pytest.raises(FileNotFoundError, match="ego_pose"):
        NuScenesReader(root, DORORO_TABLES)
    with pytest.raises(FileNotFoundError, match="v1.0-nope"):
        NuScenesReader(root, "v1.0-nope")


# ---------------------------------------------------------------- nuScenes mmdet3d infos

def test_nuscenes_info_scene0061(data_dir):
    reader = NuScenesInfoReader(data_dir / SCENE61 / "n015-2018-07-24-11-22-45+0800.pkl",
                                data_dir / SCENE61, trust_pickle=True)
    assert len(reader) == 1
    sample = reader[0]
    assert sample.token == "ca9a282c9e77460f8360f564131a8af5"
    assert len(sample.scan) == 34688 and sample.labels is None
    assert len(np.unique(sample.scan.column("ring"))) == 32
    expected = {"CAM_FRONT": 3067, "CAM_FRONT_LEFT": 3704, "CAM_FRONT_RIGHT": 3079,
                "CAM_BACK": 4826, "CAM_BACK_LEFT": 4097, "CAM_BACK_RIGHT": 3379}
    got = {c.name: int(project_points(sample.scan.xyz, c.calibration, 1.0).valid.sum())
           for c in sample.cameras}
    assert got == expected
    assert sample.scene == "n015-2018-07-24-11-22-45+0800"   # no scene token in v1.1 infos: log name
    assert reader.sample_scenes() == [sample.scene]


def test_nuscenes_info_lidarseg_labels(data_dir):
    reader = NuScenesInfoReader(data_dir / LIDARSEG / "nus_info.pkl", data_dir / LIDARSEG,
                                skip_missing_images=True, trust_pickle=True)
    assert len(reader) == 2
    sample = reader[0]
    assert len(sample.scan) == 40 and sample.cameras == []
    names = {n: int((sample.labels == NUSCENES16_CLASSES.index(n)).sum()) for n in
             ("car", "driveable_surface", "terrain", "manmade", "vegetation")}
    # README: 17 car ×2, 24 driveable ×15, 27 terrain ×1, 28 manmade ×12, 30 vegetation ×1, 31 ego ×9
    assert names == {"car": 2, "driveable_surface": 15, "terrain": 1, "manmade": 12, "vegetation": 1}
    assert int((sample.labels == -1).sum()) == 9
    raw = np.fromfile(data_dir / LIDARSEG / "lidarseg/v1.0-trainval/5f6c1e0a0c3b444b97e78d2aa3fa34d2_lidarseg.bin",
                      dtype=np.uint8)
    assert np.all(sample.labels[raw == 31] == -1)      # vehicle.ego is ignored
    with pytest.raises(FileNotFoundError, match="CAM_FRONT"):
        NuScenesInfoReader(data_dir / LIDARSEG / "nus_info.pkl", data_dir / LIDARSEG, trust_pickle=True)[0]


def test_nuscenes_info_sweeps_match_mmdet3d(data_dir):
    path = data_dir / LIDARSEG / "nus_info.pkl"
    reader = NuScenesInfoReader(path, data_dir / LIDARSEG, cameras=(), num_sweeps=5, trust_pickle=True)
    sample = reader[1]
    info = pickle.loads(path.read_bytes())["data_list"][1]
    assert len(sample.sweeps) == len(info["lidar_sweeps"]) == 2
    for (sweep, T), ref in zip(sample.sweeps, info["lidar_sweeps"]):
        assert len(sweep) == 100 and sweep.stamp_ns < sample.scan.stamp_ns
        # mmdet3d stores the key-frame → sweep lidar transform: ours must be its inverse
        # (stored as float32: agreement to 0.1 mm)
        np.testing.assert_allclose(T @ np.asarray(ref["lidar_points"]["lidar2cam"]), np.eye(4),
                                   atol=1e-4)
    assert reader[0].sweeps == []


def test_nuscenes_info_rejects_other_info_files(data_dir):
    with pytest.raises(Clip2SceneError, match="lidar_points"):
        NuScenesInfoReader(data_dir / SCANNET_INFO, data_dir / LIDARSEG, trust_pickle=True)
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        NuScenesInfoReader(data_dir / LIDARSEG / "nope.pkl", data_dir / LIDARSEG, trust_pickle=True)


# ---------------------------------------------------------------- SemanticKITTI

@pytest.fixture(scope="module")
def skitti(data_dir):
    return SemanticKittiReader(data_dir / SKITTI, sequences=["00"])


def test_semantickitti_scans_and_labels(skitti, data_dir):
    assert len(skitti) == 3
    raw_dir = data_dir / SKITTI / "sequences/00/labels"
    for i, n in enumerate((124668, 124605, 124478)):
        sample = skitti[i]
        assert len(sample.scan) == n and sample.scan.fields == ("x", "y", "z", "intensity")
        assert sample.labels.dtype == np.int64 and sample.labels.shape == (n,)
        assert sample.labels.min() == -1 and sample.labels.max() <= 18
        raw = np.fromfile(raw_dir / f"{i:06d}.label", dtype=np.uint32) & 0xFFFF
        for raw_id, name in ((40, "road"), (60, "road"), (10, "car"), (70, "vegetation"),
                             (48, "sidewalk"), (81, "traffic-sign")):
            if (raw == raw_id).any():
                assert np.all(sample.labels[raw == raw_id] == SEMANTICKITTI19_CLASSES.index(name))
        assert np.all(sample.labels[(raw == 0) | (raw == 1) | (raw == 52) | (raw == 99)] == -1)
        assert sample.cameras == [] and sample.sweeps == [] and sample.lidar_to_world is None
        assert sample.token == f"00/{i:06d}" and sample.scene == "00"
    assert skitti.sample_scenes() == ["00", "00", "00"]


def test_semantickitti_matches_mmdet3d_subset(skitti, data_dir):
    """The 50-point mmdet3d fixture is a subset of frame 0: same points, same labels."""
    sub = SemanticKittiReader(data_dir / "semantickitti/mmdet3d_tests", sequences=[0])[0]
    full = skitti[0]
    keys = {tuple(p): i for i, p in enumerate(full.scan.points)}
    idx = np.array([keys[tuple(p)] for p in sub.scan.points])
    np.testing.assert_array_equal(full.labels[idx], sub.labels)


def test_kitti_camera_projection_count(skitti, data_dir):
    calib = parse_kitti_calib(data_dir / SKITTI / "sequences/00/calib.txt")
    cal = kitti_camera_calibration(calib, 1241, 376, "P2")
    xyz = skitti[0].scan.xyz
    proj = project_points(xyz, cal, min_depth=0.1)
    assert int(proj.valid.sum()) == 19369          # README: P2 @ Tr, 1241x376
    P = calib["P2"].reshape(3, 4)
    Tr = np.vstack([calib["Tr"].reshape(3, 4), [0, 0, 0, 1]])
    h = np.c_[xyz.astype(np.float64), np.ones(len(xyz))] @ (P @ Tr).T
    np.testing.assert_allclose(proj.uv[proj.valid], h[proj.valid, :2] / h[proj.valid, 2:], atol=1e-6)
    with pytest.raises(CalibrationError, match="P7"):
        kitti_camera_calibration(calib, 1241, 376, "P7")


def test_kitti_object_calibration_with_r0_rect(data_dir):
    """Object-detection files add R0_rect; K·T must equal mmdet3d's lidar2img = P2·R0·Tr."""
    info = pickle.loads((data_dir / "kitti/mmdet3d_demo/000008.pkl").read_bytes())["data_list"][0]
    calib = {"P2": np.asarray(info["images"]["CAM2"]["cam2img"]).reshape(-1),
             "R0_rect": np.asarray(info["images"]["R0_rect"]).reshape(-1),
             "Tr_velo_to_cam": np.asarray(info["lidar_points"]["Tr_velo_to_cam"]).reshape(-1)}
    cal = kitti_camera_calibration(calib, 1242, 375)
    K = np.eye(4)
    K[:3, :3] = cal.camera.K
    np.testing.assert_allclose(K @ cal.lidar_to_camera, np.asarray(info["images"]["CAM2"]["lidar2img"]),
                               rtol=1e-6, atol=1e-6)   # mmdet3d stored float32 products
    pts = np.fromfile(data_dir / "kitti/mmdet3d_demo/000008.bin", dtype=np.float32).reshape(-1, 4)
    valid = project_points(pts[:, :3], cal).valid
    assert valid.mean() > 0.9     # the demo scan holds only points in the camera's field of view


def test_semantickitti_poses_image_and_sweeps(data_dir, tmp_path):
    root = _mirror(data_dir / SKITTI, tmp_path / "kitti")
    seq = root / "sequences/00"
    calib = parse_kitti_calib(seq / "calib.txt")
    Tr = np.vstack([calib["Tr"].reshape(3, 4), [0, 0, 0, 1]])
    # cam0 poses of a car driving forward (+z in cam0) and turning slowly
    poses = []
    for k in range(3):
        a = 0.02 * k
        P = np.eye(4)
        P[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
        P[:3, 3] = [0.1 * k, 0.0, 0.8 * k]
        poses.append(P)
    (seq / "poses.txt").write_text("\n".join(" ".join(f"{v:.12e}" for v in P[:3].reshape(-1))
                                             for P in poses) + "\n")
    (seq / "times.txt").write_text("0.0\n1.036e-01\n2.072e-01\n")
    (seq / "image_2").mkdir()
    (seq / "image_2/000001.png").symlink_to((data_dir / "kitti/mmdet3d_demo/000008.png").resolve())
    reader = SemanticKittiReader(root, ["00"], num_sweeps=2)
    s2 = reader[2]
    lidar = [invert_transform(Tr) @ P @ Tr for P in poses]
    np.testing.assert_allclose(s2.lidar_to_world, lidar[2], atol=1e-9)
    assert [len(s) for s, _ in s2.sweeps] == [124605, 124668]
    assert s2.scan.stamp_ns == 207200000 and s2.sweeps[0][0].stamp_ns == 103600000
    np.testing.assert_allclose(s2.sweeps[0][1], invert_transform(lidar[2]) @ lidar[1], atol=1e-9)
    np.testing.assert_allclose(s2.sweeps[1][1], invert_transform(lidar[2]) @ lidar[0], atol=1e-9)
    assert reader[0].sweeps == [] and len(reader[1].sweeps) == 1
    assert reader[2].cameras == []
    cam = reader[1].cameras[0]
    assert cam.name == "image_2" and cam.image.shape == (375, 1242, 3)
    assert cam.calibration.camera.width == 1242


def test_semantickitti_errors(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="sequences/07"):
        SemanticKittiReader(data_dir / SKITTI, ["07"])
    root = _mirror(data_dir / SKITTI, tmp_path / "kitti")
    label = root / "sequences/00/labels/000000.label"
    label.unlink()
    label.symlink_to((data_dir / "semantickitti/mmdet3d_tests/sequences/00/labels/000000.label").resolve())
    reader = SemanticKittiReader(root, ["00"])
    with pytest.raises(InvalidPointCloudError, match="50 labels for 124668 points"):
        reader[0]
    (root / "sequences/00/velodyne/000002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="000002.bin"):
        reader[2]
    (root / "sequences/00/calib.txt").unlink()
    (root / "sequences/00/calib.txt").write_text("P0: 1 2 3\nTr 4 5\n")
    with pytest.raises(CalibrationError):
        parse_kitti_calib(root / "sequences/00/calib.txt")


# ---------------------------------------------------------------- ScanNet

@pytest.fixture(scope="module")
def scannet(data_dir):
    return ScanNetReader(data_dir / SCANNET, posed_images=data_dir / SCANNET_INFO, trust_pickle=True)


def _colour_agreement(sample) -> list[float]:
    """Correlation of vertex brightness with the image brightness at each projected vertex."""
    out = []
    for cam in sample.cameras:
        proj = project_points(sample.scan.xyz, cam.calibration, min_depth=0.1)
        if proj.valid.sum() < 100:
            out.append(0.0)
            continue
        ij = proj.pixel_indices
        pixel = cam.image[ij[:, 1], ij[:, 0]].astype(np.float64).mean(1)
        vertex = sample.scan.points[proj.valid, 3:6].astype(np.float64).mean(1)
        out.append(float(np.corrcoef(pixel, vertex)[0, 1]))
    return out


def test_scannet_scene_labels(scannet, data_dir):
    assert len(scannet) == 1
    sample = scannet[0]
    assert sample.token == sample.scene == "scene0000_00"
    assert len(sample.scan) == 81369 and sample.scan.fields == ("x", "y", "z", "r", "g", "b")
    assert sample.vocabulary_name == "scannet20" and sample.class_names == SCANNET20_CLASSES
    raw = np.load(data_dir / SCANNET / "scene0000_00_sem_label_all.npy")
    assert np.all(sample.labels[raw == 1] == SCANNET20_CLASSES.index("wall"))
    assert np.all(sample.labels[raw == 39] == SCANNET20_CLASSES.index("otherfurniture"))
    assert np.all(sample.labels[(raw == 0) | (raw == 40) | (raw == 22)] == -1)
    assert sample.labels.max() <= 19
    np.testing.assert_array_equal(sample.lidar_to_world, np.eye(4))
    assert scannet.sample_scenes() == ["scene0000_00"]


def test_scannet_posed_images_fit_the_aligned_points(scannet, data_dir):
    sample = scannet[0]
    assert [c.name for c in sample.cameras] == ["00000", "00011", "00102"]
    assert all(c.image.shape == (968, 1296, 3) for c in sample.cameras)
    # With the axis alignment undone, image colour follows vertex colour (occlusion aside) ...
    assert min(_colour_agreement(sample)) > 0.3
    # ... and without it (treating the aligned points as raw) it does not.
    wrong = ScanNetReader(data_dir / SCANNET, posed_images=data_dir / SCANNET_INFO,
                          points_aligned=False, trust_pickle=True)[0]
    assert max(_colour_agreement(wrong)) < 0.1


def test_scannet_unaligned_demo_counts(data_dir):
    reader = ScanNetReader(data_dir / SCANNET, posed_images=data_dir / SCANNET_INFO,
                           points_aligned=False, trust_pickle=True)
    demo = np.fromfile(data_dir / "scannet/mmdet3d_demo/scene0000_00.bin", dtype=np.float32).reshape(-1, 6)
    counts = [int(project_points(demo[:, :3], cal, 0.1).valid.sum()) for _, cal in reader.calibrations(0)]
    assert counts == [2204, 2996, 9338]        # README, inverse(extrinsic) + intrinsics
    with pytest.raises(FileNotFoundError, match="scene0999_00"):
        ScanNetReader(data_dir / SCANNET, scenes=["scene0999_00"])


# ---------------------------------------------------------------- RELLIS-3D

def test_rellis3d_frame(data_dir):
    reader = Rellis3DReader(data_dir / RELLIS)
    assert len(reader) == 1                      # vel000104.bin (Velodyne) is not an Ouster scan
    sample = reader[0]
    assert len(sample.scan) == 131072
    assert int((np.abs(sample.scan.xyz).sum(1) == 0).sum()) == 53364
    assert sample.vocabulary_name is None and sample.class_names == RELLIS3D_CLASSES
    assert reader.sample_scenes() == [sample.scene]
    raw = np.fromfile(data_dir / RELLIS / "000104.label", dtype=np.uint32) & 0xFFFF
    np.testing.assert_array_equal(sample.labels == -1, raw == 0)
    for raw_id, name in ((3, "grass"), (4, "tree"), (17, "person"), (19, "bush"), (33, "mud")):
        assert np.all(sample.labels[raw == raw_id] == RELLIS3D_CLASSES.index(name))
    (cam,) = sample.cameras
    assert cam.image.shape == (1200, 1920, 3)
    proj = project_points(sample.scan.xyz, cam.calibration, min_depth=0.5)
    assert int(proj.valid.sum()) == 7428           # README, no undistortion
    label_image = cv2.imread(str(data_dir / RELLIS / "frame000104-1581624663_149.png"), cv2.IMREAD_UNCHANGED)
    ij = proj.pixel_indices
    agreement = float((label_image[ij[:, 1], ij[:, 0]] == raw[proj.valid]).mean())
    assert agreement == pytest.approx(0.773, abs=0.001)   # README: 77.3 %


def test_rellis3d_drop_no_return(data_dir):
    """``drop_no_return`` removes the (0, 0, 0) rows of the Ouster scan with their labels."""
    raw_pts = np.fromfile(data_dir / RELLIS / "000104.bin", dtype=np.float32).reshape(-1, 4)
    raw_lab = np.fromfile(data_dir / RELLIS / "000104.label", dtype=np.uint32) & 0xFFFF
    returned = np.flatnonzero(np.any(raw_pts[:, :3] != 0, axis=1))
    sample = Rellis3DReader(data_dir / RELLIS, drop_no_return=True)[0]
    assert len(sample.scan) == 131072 - 53364 == len(returned)
    np.testing.assert_array_equal(sample.scan.points, raw_pts[returned])
    np.testing.assert_array_equal(sample.labels == -1, raw_lab[returned] == 0)
    assert sample.labels[raw_lab[returned] == 23][0] == RELLIS3D_CLASSES.index("concrete")
    # the data config reaches it through the reader's arguments
    from training.engine.config import DataConfig
    from training.engine.data import build_reader
    reader = build_reader(DataConfig(reader="Rellis3DReader", args={"root": str(data_dir / RELLIS),
                                                                     "drop_no_return": True}))
    assert len(reader[0].scan) == len(returned)


def test_rellis3d_distortion_and_errors(data_dir, tmp_path):
    sample = Rellis3DReader(data_dir / RELLIS, distortion=RELLIS3D_NOTEBOOK_DISTORTION)[0]
    cam = sample.cameras[0].calibration.camera
    assert cam.distortion_model == "plumb_bob"
    np.testing.assert_allclose(cam.D, RELLIS3D_NOTEBOOK_DISTORTION)
    root = _mirror(data_dir / RELLIS, tmp_path / "rellis")
    (root / "transforms.yaml").unlink()
    reader = Rellis3DReader(root)
    with pytest.raises(FileNotFoundError, match="transforms.yaml"):
        reader[0]
    no_images = Rellis3DReader(root, load_images=False)
    assert no_images[0].cameras == []
    (root / "000104.bin").unlink()
    with pytest.raises(FileNotFoundError, match="000104.bin"):
        no_images[0]
    # the Velodyne scan (37334 points) under the Ouster name: labels no longer fit
    (root / "000104.bin").symlink_to((data_dir / RELLIS / "vel000104.bin").resolve())
    with pytest.raises(InvalidPointCloudError, match="131072 labels for 37334 points"):
        no_images[0]


# ---------------------------------------------------------------- the reader registry

class ToyReader(DatasetReader):
    """A new labelled reader in one class: KITTI-style ``velodyne/*.bin`` + ``labels/*.label``
    folders, two classes of its own (raw 40 = road, 0 = unlabelled → ignore, the rest other)."""

    CLASSES = ("road", "other")

    def __init__(self, root: str, max_frames: int | None = None) -> None:
        self.root = Path(root)
        self._stems = sorted(p.stem for p in (self.root / "velodyne").glob("*.bin"))[:max_frames]

    def __len__(self) -> int:
        return len(self._stems)

    def _load(self, index: int) -> Sample:
        stem = self._stems[index]
        pts = load_points_bin(self.root / "velodyne" / f"{stem}.bin", 4)
        raw = load_label_array(self.root / "labels" / f"{stem}.label", np.uint32, len(pts)) & 0xFFFF
        labels = np.where(raw == 0, -1, np.where(raw == 40, 0, 1))
        return Sample(Scan(pts, ("x", "y", "z", "intensity")), labels=labels, token=stem,
                      scene="toy", class_names=self.CLASSES)


def test_a_new_reader_is_one_registry_entry(monkeypatch, data_dir):
    """Registered under a name, a reader is built from a training config (relative paths
    resolved, arguments checked) and feeds training's data pipeline."""
    from training.engine.config import DataConfig
    from training.engine.data import TrainDataset, build_reader

    monkeypatch.setitem(READERS, "ToyReader", ToyReader)
    cfg = DataConfig(reader="ToyReader", args={"root": f"{SKITTI}/sequences/00", "max_frames": 2},
                     max_points=5000, use_sweeps=False)
    reader = build_reader(cfg, base_dir=data_dir)
    assert isinstance(reader, ToyReader) and len(reader) == 2
    sample = reader[1]
    assert sample.class_names == ToyReader.CLASSES and set(np.unique(sample.labels)) <= {-1, 0, 1}
    assert (sample.labels == 0).sum() > 1000            # the scan's road points
    prepared = TrainDataset(reader, cfg, seed=0, embed_dim=8, need_labels=True)[0]
    assert len(prepared.scans[0]) == 5000 and prepared.gt.shape == (5000,)
    with pytest.raises(ConfigError, match="do not fit ToyReader"):
        build_reader(DataConfig(reader="ToyReader", args={"folder": "x"}))
    monkeypatch.delitem(READERS, "ToyReader")
    with pytest.raises(ConfigError, match="unknown reader 'ToyReader'.*Rellis3DReader"):
        build_reader(cfg, base_dir=data_dir)


# ---------------------------------------------------------------- Sample

def test_sample_rejects_mismatched_labels(data_dir):
    pts = np.fromfile(data_dir / "semantickitti/mmdet3d_tests/sequences/00/velodyne/000000.bin",
                      dtype=np.float32).reshape(-1, 4)
    scan = Scan(pts)
    with pytest.raises(InvalidPointCloudError, match="49 labels for 50 points"):
        Sample(scan=scan, labels=np.zeros(49, np.int64), vocabulary_name="semantickitti19")
    with pytest.raises(InvalidPointCloudError, match="outside"):
        Sample(scan=scan, labels=np.full(50, 19), vocabulary_name="semantickitti19")
    ok = Sample(scan=scan, labels=np.zeros(50, np.uint8), vocabulary_name="semantickitti19")
    assert ok.labels.dtype == np.int64
