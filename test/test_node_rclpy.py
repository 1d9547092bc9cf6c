"""The real rclpy node, end to end over DDS: publish a real nuScenes sweep, the CAM_FRONT JPEG,
its CameraInfo and the static LiDAR→camera transform; receive the labelled cloud, the
overlay and /diagnostics. Needs a sourced ROS 2 (Humble or Jazzy) with message_filters,
tf2_ros and diagnostic_msgs; skipped cleanly anywhere else.

    source /opt/ros/jazzy/setup.bash && python3 -m pytest -q test/test_node_rclpy.py
"""
from __future__ import annotations

import threading
import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("message_filters")
pytest.importorskip("tf2_ros")
pytest.importorskip("diagnostic_msgs.msg")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2  # noqa: E402
from tf2_ros import StaticTransformBroadcaster  # noqa: E402

from clip2scene_core.errors import ConfigError  # noqa: E402
from clip2scene_ros.msgs import MessageFactory  # noqa: E402
from clip2scene_ros.node import SegmenterNode  # noqa: E402
from clip2scene_ros.node_config import NODE_NAME  # noqa: E402
from clip2scene_ros.pointcloud2 import read_points  # noqa: E402
from clip2scene_ros.tf import matrix_to_transform  # noqa: E402

from test_pipeline import (FRONT_STAMP, LIDAR_STAMP, load_nuscenes, make_camera, make_cloud,  # noqa: E402
                           subsample, tiny_checkpoint)

MS = 1_000_000


@pytest.fixture
def ros():
    rclpy.init()
    yield
    if rclpy.ok():
        rclpy.shutdown()


def _wait(predicate, timeout_s: float, tick=None) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if tick is not None:
            tick()
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _overrides(checkpoint, **extra):
    params = {"checkpoint": str(checkpoint), "device": "cpu", "lidar_topic": "/c2s_test/points",
              "cameras": ["front"], "camera.front.transport": "compressed",
              "camera.front.image_topic": "/c2s_test/front/image/compressed",
              "camera.front.info_topic": "/c2s_test/front/camera_info",
              "camera_timeout": 0.5, "tf_timeout": 0.5} | extra
    return [Parameter(k, value=v) for k, v in params.items()]


def test_node_labels_a_real_sweep_over_ros(ros, tmp_path, data_dir):
    factory = MessageFactory.from_rclpy()
    nusc = load_nuscenes(data_dir)
    points = subsample(nusc.points)
    node = SegmenterNode(parameter_overrides=_overrides(tiny_checkpoint(tmp_path / "tiny.pt")))
    tester = rclpy.create_node("c2s_tester")
    clouds, overlays, diagnostics = [], [], []
    tester.create_subscription(PointCloud2, f"/{NODE_NAME}/labeled_points", clouds.append, 10)
    tester.create_subscription(Image, f"/{NODE_NAME}/overlay/front", overlays.append, 10)
    tester.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    cloud_pub = tester.create_publisher(PointCloud2, "/c2s_test/points", qos_profile_sensor_data)
    image_pub = tester.create_publisher(CompressedImage, "/c2s_test/front/image/compressed",
                                        qos_profile_sensor_data)
    info_pub = tester.create_publisher(CameraInfo, "/c2s_test/front/camera_info",
                                       qos_profile_sensor_data)
    static_tf = StaticTransformBroadcaster(tester)
    static_tf.sendTransform(matrix_to_transform(nusc.lidar2cam, factory, "CAM_FRONT", "LIDAR_TOP",
                                                LIDAR_STAMP))
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    executor.add_node(tester)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    step = [0]

    def publish_frame():
        """One 10 Hz cycle: image + info 35 ms before the sweep, then the sweep."""
        offset = step[0] * 100 * MS
        step[0] += 1
        cam = make_camera(nusc, factory, stamp_ns=FRONT_STAMP + offset)
        image_pub.publish(cam.image)
        info_pub.publish(cam.info)
        cloud_pub.publish(make_cloud(points, factory, LIDAR_STAMP + offset))

    try:
        assert _wait(lambda: len(clouds) >= 1 and len(overlays) >= 1, 90.0, tick=publish_frame), \
            f"no output after {step[0]} frames (clouds {len(clouds)}, overlays {len(overlays)})"
        out = clouds[0]
        assert out.header.frame_id == "LIDAR_TOP"
        assert [f.name for f in out.fields] == ["x", "y", "z", "intensity", "label", "score", "rgb"]
        got = read_points(out)
        assert len(got) == len(points)
        assert got["label"].max() < 16
        assert (overlays[0].width, overlays[0].height, overlays[0].encoding) == (1600, 900, "rgb8")
        assert _wait(lambda: any(s.values for d in diagnostics for s in d.status), 10.0)
        values = {kv.key: kv.value for d in diagnostics for s in d.status for kv in s.values}
        assert values["device"] == "cpu" and int(values["frames_ok"]) >= 1

        # run-time parameters: class_names needs a text encoder (none loaded) → refused;
        # the topology parameters are read-only
        result = node.set_parameters([Parameter("class_names", value=["car", "road"])])[0]
        assert not result.successful and "text encoder" in result.reason
        assert not node.set_parameters([Parameter("slop", value=0.2)])[0].successful
    finally:
        node.shutdown()
        executor.shutdown()
        spinner.join(timeout=10)
        node.destroy_node()
        tester.destroy_node()


def test_node_refuses_bad_parameters(ros, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(ConfigError, match="device"):
        SegmenterNode(parameter_overrides=_overrides(ckpt, device="tpu"))
    with pytest.raises(ConfigError, match="checkpoint"):
        SegmenterNode(parameter_overrides=_overrides(ckpt, checkpoint=""))
