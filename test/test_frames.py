"""The frame source on real converted bags: sweeps, cameras, TF and ground truth, no segmenter.

nuScenes key frames (six cameras, ego poses in /tf) and a SemanticKITTI scan with ground
truth, written to bags by training/tools, read back through `clip2scene_ros.frames`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip2scene_core.datasets import NuScenesReader, SemanticKittiReader
from clip2scene_core.errors import ConfigError
from clip2scene_ros.bag import BagReader
from clip2scene_ros.frames import Frame, FrameSource, FrameSourceOptions, GroundTruthStore
from clip2scene_ros.image import camera_info_to_model
from clip2scene_ros.msgs import header_stamp_ns
from clip2scene_ros.node_config import NodeConfig
from clip2scene_ros.pointcloud2 import read_points
from training.tools import nuscenes_to_bag, semantickitti_to_bag

NUS3 = "nuscenes/dororo99_v1.0-extract_3samples"
TABLES = "v1.0-extract-subset"
KITTI = "semantickitti/mmdet3d_tests"
CAMERAS = ["cam_back", "cam_back_left", "cam_back_right", "cam_front", "cam_front_left",
           "cam_front_right"]


@pytest.fixture(scope="module")
def nus_bag(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("frames") / "nus"
    assert nuscenes_to_bag.main(["--root", str(data_dir / NUS3), "--version-dir", TABLES,
                                 "--out", str(out), "--max-samples", "2", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def kitti_bag(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("frames") / "kitti"
    assert semantickitti_to_bag.main(["--root", str(data_dir / KITTI), "--out", str(out),
                                      "--quiet"]) == 0
    return out


def _read(bag: Path, **kw) -> tuple[FrameSource, list[tuple[Frame, dict[str, np.ndarray]]]]:
    """Every frame, with the LiDAR → camera transforms looked up while it is current."""
    source = FrameSource(FrameSourceOptions(bag=bag, **kw))
    frames = []
    with source:
        for frame in source:
            lookups = {name: frame.tf(str(cam.image.header.frame_id), cam.stamp_ns,
                                      str(frame.lidar.header.frame_id), frame.stamp_ns)
                       for name, cam in frame.cameras.items()}
            frames.append((frame, lookups))
    return source, frames


def test_sweeps_with_cameras_and_tf_like_the_dataset(nus_bag, data_dir):
    source, frames = _read(nus_bag)
    samples = NuScenesReader(data_dir / NUS3, TABLES)
    assert [f.index for f, _ in frames] == [0, 1]
    assert source.counters.lidar_messages == 2
    assert not any(source.counters.dropped.values()) and not source.counters.camera_skips
    assert source.topics.lidar == "/lidar_top/points" and source.topics.gt is None
    for (frame, lookups), sample in zip(frames, samples):
        assert frame.stamp_ns == header_stamp_ns(frame.lidar) == sample.scan.stamp_ns
        assert frame.received_ns > 0 and frame.gt is None and frame.skipped == {}
        pts = read_points(frame.lidar)
        assert pts.size == len(sample.scan)
        np.testing.assert_array_equal(pts["x"], sample.scan.xyz[:, 0])
        assert sorted(frame.cameras) == CAMERAS
        for ref in sample.cameras:
            cam = frame.cameras[ref.name.lower()]
            assert cam.stamp_ns == ref.stamp_ns      # the image the dataset pairs with the sweep
            assert abs(cam.stamp_ns - frame.stamp_ns) <= NodeConfig().sync.slop_ns
            np.testing.assert_allclose(camera_info_to_model(cam.info).K, ref.calibration.camera.K)
            # the node's TF policy over the bag's TF gives the dataset's LiDAR → camera
            np.testing.assert_allclose(lookups[cam.name], ref.calibration.lidar_to_camera, atol=1e-4)
    assert source.tf_lookup.fallbacks == 0 and source.tf_lookup.active_fixed_frame() == "map"


def test_ground_truth_arrives_with_its_sweep(kitti_bag, data_dir):
    sample = SemanticKittiReader(data_dir / KITTI)[0]
    source, frames = _read(kitti_bag)
    (frame, _), = frames
    assert source.topics.gt == "/clip2scene/labels" and frame.cameras == {}
    np.testing.assert_array_equal(frame.gt, sample.labels)
    store = source.ground_truth
    assert isinstance(store, GroundTruthStore) and not store.skipped
    assert store.class_names == list(sample.class_names)
    # without ground truth: the label clouds are not read
    source, frames = _read(kitti_bag, read_gt=False)
    assert frames[0][0].gt is None and source.topics.gt is None and source.ground_truth.labels == {}


def test_every_message_is_seen_and_what_is_left_out_is_counted(nus_bag):
    seen = []
    source = FrameSource(FrameSourceOptions(bag=nus_bag, all_topics=True, max_frames=1,
                                            use_cameras=False))
    with source:
        total = source.total_messages
        frames = list(source.frames(lambda topic, *_: seen.append(topic)))
    with BagReader(nus_bag) as reader:
        counts = reader.message_counts
    assert len(seen) == sum(counts.values()) == total
    assert len(frames) == 1 and frames[0].cameras == {}
    assert source.counters.lidar_messages == 2
    assert source.counters.dropped["beyond --max-frames"] == 1


def test_options_are_checked():
    with pytest.raises(ConfigError, match="tf tolerance"):
        FrameSourceOptions(bag=Path("x"), tf_tolerance_s=float("nan"))
