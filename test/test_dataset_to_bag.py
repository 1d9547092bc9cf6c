"""Dataset → rosbag2 converters on the real nuScenes / SemanticKITTI samples in test/data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip2scene_core.datasets import NuScenesInfoReader, NuScenesReader, SemanticKittiReader
from clip2scene_core.geometry import project_points
from clip2scene_core.geometry.transforms import invert_transform
from clip2scene_core.types import Calibration
from clip2scene_ros.bag import LABEL_CLASSES_TOPIC, LABELS_TOPIC, BagReader
from clip2scene_ros.image import camera_info_to_model, compressed_to_rgb
from clip2scene_ros.msgs import header_stamp_ns
from clip2scene_ros.pointcloud2 import read_points
from clip2scene_ros.tf import TransformBuffer
from training.tools import nuscenes_to_bag, semantickitti_to_bag

NUS3 = "nuscenes/dororo99_v1.0-extract_3samples"
NUS3_TABLES = "v1.0-extract-subset"
SCENE61 = "nuscenes/mmdet3d_demo_scene-0061"
LIDARSEG = "nuscenes/mmdet3d_tests_lidarseg"
KITTI = "semantickitti/squeezesegv3_sample_data"


def _read_all(path: Path) -> tuple[dict[str, str], list]:
    with BagReader(path) as r:
        return r.topics, list(r.messages())


@pytest.fixture(scope="module")
def nus_bag(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("conv") / "nus3"
    assert nuscenes_to_bag.main(["--root", str(data_dir / NUS3), "--version-dir", NUS3_TABLES,
                                 "--out", str(out), "--quiet"]) == 0
    return out


def test_nuscenes_devkit_bag_topics_stamps_frames(nus_bag, data_dir):
    reader = NuScenesReader(data_dir / NUS3, NUS3_TABLES)
    topics, msgs = _read_all(nus_bag)
    assert topics["/lidar_top/points"] == "sensor_msgs/msg/PointCloud2"
    for cam in ("cam_front", "cam_back_left"):
        assert topics[f"/{cam}/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
        assert topics[f"/{cam}/camera_info"] == "sensor_msgs/msg/CameraInfo"
    assert "/tf" in topics and "/tf_static" in topics
    # bag time never goes backwards
    times = [m.log_time_ns for m in msgs]
    assert times == sorted(times)

    clouds = [m for m in msgs if m.topic == "/lidar_top/points"]
    assert len(clouds) == len(reader) == 3
    samples = [reader[i] for i in range(len(reader))]
    for cloud, sample in zip(clouds, samples):
        assert cloud.msg.header.frame_id == "lidar_top"
        assert header_stamp_ns(cloud.msg) == sample.scan.stamp_ns == cloud.log_time_ns
        pts = read_points(cloud.msg)
        assert pts.dtype.names == ("x", "y", "z", "intensity", "ring")
        assert pts["ring"].dtype == np.uint16 and pts.size == len(sample.scan)
        np.testing.assert_array_equal(pts["x"], sample.scan.points[:, 0])
        np.testing.assert_array_equal(pts["intensity"], sample.scan.points[:, 3])
        np.testing.assert_array_equal(pts["ring"], sample.scan.points[:, 4].astype(np.uint16))

    # every camera image keeps its own (dataset) stamp, with its CameraInfo at the same stamp
    cam_stamps = {(m.topic.split("/")[1], header_stamp_ns(m.msg)) for m in msgs
                  if m.topic.endswith("/compressed")}
    info_stamps = {(m.topic.split("/")[1], header_stamp_ns(m.msg)) for m in msgs
                   if m.topic.endswith("/camera_info")}
    want = {(c.name.lower(), c.stamp_ns) for s in samples for c in s.cameras}
    assert cam_stamps == want == info_stamps
    img = next(m for m in msgs if m.topic == "/cam_front/image_raw/compressed")
    assert img.msg.header.frame_id == "cam_front_optical_frame"
    rgb = compressed_to_rgb(img.msg)
    ref = next(c for c in samples[0].cameras if c.name == "CAM_FRONT").image
    assert rgb.shape == ref.shape
    assert np.abs(rgb.astype(int) - ref.astype(int)).mean() < 4.0   # JPEG re-encoding only


def test_nuscenes_tf_and_camera_info_reproduce_dataset_calibration(nus_bag, data_dir):
    """LiDAR points projected with the bag's CameraInfo + TF (camera pose at the image stamp,
    LiDAR pose at the sweep stamp, through map) land where the core projection with the
    dataset reader's calibration puts them."""
    reader = NuScenesReader(data_dir / NUS3, NUS3_TABLES)
    sample = reader[0]
    _, msgs = _read_all(nus_bag)
    buf = TransformBuffer(cache_duration_ns=10**18)
    infos = {}
    for m in msgs:
        if m.topic in ("/tf", "/tf_static"):
            buf.add_transforms(m.msg.transforms, static=m.topic == "/tf_static")
        elif m.topic.endswith("camera_info"):
            infos[(m.topic, header_stamp_ns(m.msg))] = m.msg
        if m.log_time_ns > sample.scan.stamp_ns + 10**8:
            break   # the next scene has another calibration
    t_lidar = sample.scan.stamp_ns
    for cam in sample.cameras:
        name = cam.name.lower()
        info = infos[(f"/{name}/camera_info", cam.stamp_ns)]
        model = camera_info_to_model(info)
        np.testing.assert_allclose(model.K, cam.calibration.camera.K)
        assert (model.width, model.height) == (1600, 900) and model.distortion_model == "none"
        T = invert_transform(buf.lookup("map", f"{name}_optical_frame", cam.stamp_ns)) @ \
            buf.lookup("map", "lidar_top", t_lidar)
        np.testing.assert_allclose(T, cam.calibration.lidar_to_camera, atol=1e-6)
        ours = project_points(sample.scan.xyz, Calibration(model, T))
        ref = project_points(sample.scan.xyz, cam.calibration)
        assert ref.valid.sum() > 1000
        assert np.count_nonzero(ours.valid != ref.valid) <= 2   # rounding at the image border
        both = ours.valid & ref.valid
        np.testing.assert_allclose(ours.uv[both], ref.uv[both], atol=1e-3)
        # the static chain alone (no motion compensation) is the rig calibration
        static = buf.lookup(f"{name}_optical_frame", "lidar_top", t_lidar)
        assert np.allclose(static[3], [0, 0, 0, 1])


def test_nuscenes_bag_is_small_and_time_sorted_across_scenes(nus_bag):
    size = sum(f.stat().st_size for f in nus_bag.iterdir())
    assert size < 8 * 2**20      # 3 frames × (34k points + 6 JPEGs)
    meta = (nus_bag / "metadata.yaml").read_text()
    assert "storage_identifier: mcap" in meta


def test_nuscenes_info_pickle_scene0061(tmp_path, data_dir):
    out = tmp_path / "s61"
    pkl = next((data_dir / SCENE61).glob("*.pkl"))
    assert nuscenes_to_bag.main(["--info", str(pkl), "--trust-pickle", "--root", str(data_dir / SCENE61),
                                 "--out", str(out), "--quiet", "--raw-images",
                                 "--cameras", "CAM_FRONT", "CAM_BACK"]) == 0
    reader = NuScenesInfoReader(pkl, data_dir / SCENE61, cameras=["CAM_FRONT", "CAM_BACK"], trust_pickle=True)
    sample = reader[0]
    topics, msgs = _read_all(out)
    assert topics["/cam_front/image_raw"] == "sensor_msgs/msg/Image"
    assert "/cam_front_left/camera_info" not in topics
    img = next(m.msg for m in msgs if m.topic == "/cam_front/image_raw")
    assert (img.width, img.height, img.encoding) == (1600, 900, "rgb8")
    ref = next(c for c in sample.cameras if c.name == "CAM_FRONT")
    np.testing.assert_array_equal(np.asarray(img.data).reshape(900, 1600, 3), ref.image)
    buf = TransformBuffer()
    for m in msgs:
        if m.topic == "/tf_static":
            buf.add_transforms(m.msg.transforms, static=True)
    cloud = next(m.msg for m in msgs if m.topic == "/lidar_top/points")
    assert read_points(cloud).size == 34688
    T = buf.lookup("cam_front_optical_frame", "lidar_top", header_stamp_ns(cloud))
    # lidar2cam in the info file composes the same mounts (up to the ego motion it folds in)
    assert np.abs(T[:3, :3] - ref.calibration.lidar_to_camera[:3, :3]).max() < 0.01
    assert np.linalg.norm(T[:3, 3] - ref.calibration.lidar_to_camera[:3, 3]) < 0.5


def test_nuscenes_lidarseg_ground_truth_round_trip(tmp_path, data_dir):
    out = tmp_path / "seg"
    root = data_dir / LIDARSEG
    assert nuscenes_to_bag.main(["--info", str(root / "nus_info.pkl"), "--trust-pickle", "--root", str(root),
                                 "--out", str(out), "--quiet", "--sweeps", "1"]) == 0
    reader = NuScenesInfoReader(root / "nus_info.pkl", root, skip_missing_images=True, trust_pickle=True)
    sample = reader[0]
    topics, msgs = _read_all(out)
    assert topics[LABELS_TOPIC] == "sensor_msgs/msg/PointCloud2"
    classes = json.loads(next(m.msg.data for m in msgs if m.topic == LABEL_CLASSES_TOPIC))
    assert classes["vocabulary"] == "nuscenes16" and classes["class_names"][3] == "car"
    with BagReader(out) as r:
        assert json.loads(r.custom_data["clip2scene.label_classes"]) == classes
    labels = [m for m in msgs if m.topic == LABELS_TOPIC]
    clouds = {header_stamp_ns(m.msg): m.msg for m in msgs if m.topic == "/lidar_top/points"}
    first = next(m for m in labels if header_stamp_ns(m.msg) == sample.scan.stamp_ns)
    got = read_points(first.msg)["label"].astype(np.int64)
    got[got == 65535] = -1
    np.testing.assert_array_equal(got, sample.labels)
    assert (sample.labels == -1).any() and (sample.labels >= 0).any()
    assert read_points(clouds[sample.scan.stamp_ns]).size == got.size
    # sweeps are extra clouds at their own stamps without labels
    assert len(clouds) > len(labels)


def test_semantickitti_bag_with_labels(tmp_path, data_dir):
    out = tmp_path / "kitti"
    assert semantickitti_to_bag.main(["--root", str(data_dir / KITTI), "--out", str(out),
                                      "--quiet", "--storage", "sqlite3"]) == 0
    reader = SemanticKittiReader(data_dir / KITTI)
    topics, msgs = _read_all(out)
    assert next(out.glob("*.db3"))
    clouds = [m for m in msgs if m.topic == "/velodyne/points"]
    labels = [m for m in msgs if m.topic == LABELS_TOPIC]
    assert len(clouds) == len(labels) == len(reader) == 3
    stamps = [header_stamp_ns(m.msg) for m in clouds]
    assert stamps == [10**9, 11 * 10**8, 12 * 10**8]   # --start-time 1 s + frame × 0.1 s
    for i, (c, lab_msg) in enumerate(zip(clouds, labels)):
        s = reader[i]
        assert c.msg.header.frame_id == "velodyne" and header_stamp_ns(lab_msg.msg) == stamps[i]
        pts = read_points(c.msg)
        assert pts.dtype.names == ("x", "y", "z", "intensity")
        np.testing.assert_array_equal(pts["z"], s.scan.points[:, 2])
        lab = read_points(lab_msg.msg)["label"].astype(np.int64)
        lab[lab == 65535] = -1
        np.testing.assert_array_equal(lab, s.labels)
    classes = json.loads(next(m.msg.data for m in msgs if m.topic == LABEL_CLASSES_TOPIC))
    assert classes["vocabulary"] == "semantickitti19" and len(classes["class_names"]) == 19
    static = next(m.msg for m in msgs if m.topic == "/tf_static")
    assert [(t.header.frame_id, t.child_frame_id) for t in static.transforms] == [("base_link", "velodyne")]


def test_converter_refuses_to_overwrite_and_reports_bad_input(tmp_path, data_dir, capsys):
    out = tmp_path / "k"
    args = ["--root", str(data_dir / "semantickitti/mmdet3d_tests"), "--out", str(out), "--quiet"]
    assert semantickitti_to_bag.main(args) == 0
    capsys.readouterr()
    assert semantickitti_to_bag.main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert semantickitti_to_bag.main(args + ["--overwrite"]) == 0
    assert nuscenes_to_bag.main(["--root", str(tmp_path), "--out", str(tmp_path / "n"),
                                 "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_nuscenes_split_scenes_one_bag_per_scene(tmp_path, data_dir):
    """Frames of two logs (two cars, 38 days apart) go to separate bags, each with its own
    static extrinsics and an unbroken /tf time line."""
    root = data_dir / "nuscenes/dororo99_v1.0-extract_3samples"
    out = tmp_path / "split"
    rc = nuscenes_to_bag.main(["--root", str(root), "--version-dir", "v1.0-extract-subset",
                               "--out", str(out), "--split-scenes", "--cameras", "--quiet"])
    assert rc == 0
    reader = NuScenesReader(root, "v1.0-extract-subset", cameras=())
    scenes = reader.sample_scenes()
    expected = {s: scenes.count(s) for s in set(scenes)}
    bags = sorted(p.parent for p in out.glob("*/metadata.yaml"))
    assert {b.name for b in bags} == set(expected) and len(bags) == 2
    for bag in bags:
        with BagReader(bag) as r:
            assert r.message_counts["/lidar_top/points"] == expected[bag.name]
            tf_stamps = [header_stamp_ns(t) for m in r.messages(["/tf"]) for t in m.msg.transforms]
        assert max(tf_stamps) - min(tf_stamps) < 60 * 10**9   # one drive, not two logs
    # a scene filter converts just that scene, an unknown one is refused
    rc = nuscenes_to_bag.main(["--root", str(root), "--version-dir", "v1.0-extract-subset",
                               "--out", str(tmp_path / "one"), "--scene", "scene-0916", "--cameras",
                               "--quiet"])
    with BagReader(tmp_path / "one") as r:
        assert rc == 0 and r.message_counts["/lidar_top/points"] == expected["scene-0916"]
    assert nuscenes_to_bag.main(["--root", str(root), "--version-dir", "v1.0-extract-subset",
                                 "--out", str(tmp_path / "x"), "--scene", "scene-9999", "--quiet"]) == 1
