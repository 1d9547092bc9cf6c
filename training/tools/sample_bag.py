"""SampleBagWriter: lays a dataset ``Sample`` out in a rosbag2 as a robot would record it, so
the replay tool and ``ros2 bag play`` + the node see ordinary sensor topics:

- ``/<lidar>/points``              sensor_msgs/PointCloud2 (x, y, z, intensity[, ring]) in the LiDAR frame
- ``/<camera>/image_raw[/compressed]`` Image (rgb8) or CompressedImage (jpeg), optical frame
- ``/<camera>/camera_info``        CameraInfo (same stamp and frame as the image)
- ``/tf``                          map → base_link ego pose at every sensor stamp
- ``/tf_static``                   base_link → sensors, sensor body → optical frame (latched QoS)
- ``/clip2scene/labels``           ground truth, one UINT16 ``label`` per scan point (65535 = ignore),
                                   header identical to the scan's, so replay pairs them by stamp
- ``/clip2scene/label_classes``    std_msgs/String JSON {"vocabulary", "class_names"}, written once;
                                   the class list is also in metadata.yaml ``custom_data``.

Frame names are lower case ROS names (``lidar_top``, ``cam_front_optical_frame``); topic names
likewise (ROS 2 allows upper case but the convention is lower case).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from clip2scene_core.geometry.transforms import invert_transform
from clip2scene_core.types import CameraFrame, CameraModel, Scan
from clip2scene_core.label_spaces import UNLABELED
from clip2scene_ros.bag import LABEL_CLASSES_TOPIC, LABELS_TOPIC, BagWriter, latched_qos
from clip2scene_ros.image import model_to_camera_info, rgb_to_compressed, rgb_to_image
from clip2scene_ros.msgs import MessageFactory, make_header
from clip2scene_ros.pointcloud2 import FLOAT32, UINT16, create_cloud, make_point_field
from clip2scene_ros.tf import matrix_to_transform

__all__ = ["SampleBagWriter", "ros_name", "optical_frame", "OPTICAL_IN_BODY", "body_to_optical"]

#: rotation of a camera's optical frame (z forward, x right, y down) in its body frame
#: (x forward, y left, z up), as in REP 103 / 105: optical z = body x, optical x = -body y.
OPTICAL_IN_BODY = np.array([[0.0, 0.0, 1.0, 0.0],
                            [-1.0, 0.0, 0.0, 0.0],
                            [0.0, -1.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 1.0]])


def ros_name(name: str) -> str:
    """``CAM_FRONT`` → ``cam_front`` (topic / frame name)."""
    return "".join(c if c.isalnum() else "_" for c in name.strip().lower()).strip("_")


def optical_frame(camera: str) -> str:
    return f"{ros_name(camera)}_optical_frame"


def body_to_optical() -> np.ndarray:
    """Transform body ← optical (a static TF child ``*_optical_frame`` under the body frame)."""
    return OPTICAL_IN_BODY.copy()


@dataclass
class SampleBagWriter:
    """Writes LiDAR scans, cameras, TF and ground truth of dataset samples to a rosbag2."""

    out: Path
    storage: str = "mcap"
    compressed_images: bool = True
    jpeg_quality: int = 90
    overwrite: bool = False
    map_frame: str = "map"
    base_frame: str = "base_link"
    lidar_name: str = "lidar"
    factory: MessageFactory = field(default_factory=lambda: MessageFactory.from_rosbags())
    _writer: BagWriter | None = field(default=None, init=False, repr=False)
    _classes_done: bool = field(default=False, init=False, repr=False)
    frames_written: int = field(default=0, init=False)

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "SampleBagWriter":
        self._writer = BagWriter(self.out, storage=self.storage, compress=True,
                                 typestore=self.factory.typestore, overwrite=self.overwrite).open()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._writer is not None
        self._writer.__exit__(*exc)   # closes the bag (metadata.yaml) on an exception too

    @property
    def writer(self) -> BagWriter:
        if self._writer is None:
            raise RuntimeError("SampleBagWriter is not open (use it as a context manager)")
        return self._writer

    # -- names ----------------------------------------------------------------------------
    @property
    def lidar_frame(self) -> str:
        return ros_name(self.lidar_name)

    @property
    def lidar_topic(self) -> str:
        return f"/{self.lidar_frame}/points"

    def camera_topics(self, camera: str) -> tuple[str, str]:
        ns = f"/{ros_name(camera)}"
        image = f"{ns}/image_raw/compressed" if self.compressed_images else f"{ns}/image_raw"
        return image, f"{ns}/camera_info"

    # -- writing --------------------------------------------------------------------------
    def write_static(self, stamp_ns: int, base_to_sensor: dict[str, np.ndarray],
                     cameras: Sequence[str] = ()) -> None:
        """/tf_static: base_link → each sensor (4×4 sensor → base), and camera body → optical.

        Call it again when the calibration changes (a bag spanning two vehicles / logs):
        later static transforms replace earlier ones, as in tf2.

        ``base_to_sensor`` maps a frame name to the transform taking that sensor's coordinates
        into base_link. Camera entries are given for the *optical* frame (what calibration
        files describe); the body frame is derived so the optical frame hangs under it.
        """
        transforms = []
        for name, T in base_to_sensor.items():
            if name in cameras:
                body = np.asarray(T) @ invert_transform(OPTICAL_IN_BODY)
                transforms.append(matrix_to_transform(body, self.factory, self.base_frame,
                                                      ros_name(name), stamp_ns))
                transforms.append(matrix_to_transform(OPTICAL_IN_BODY, self.factory,
                                                      ros_name(name), optical_frame(name), stamp_ns))
            else:
                transforms.append(matrix_to_transform(T, self.factory, self.base_frame,
                                                      ros_name(name), stamp_ns))
        msg = self.factory.new("TFMessage", transforms=transforms)
        self.writer.write("/tf_static", msg, stamp_ns, qos=latched_qos())

    def write_ego_pose(self, stamp_ns: int, map_to_base: np.ndarray) -> None:
        """/tf: map → base_link (the ego pose) at ``stamp_ns``."""
        tr = matrix_to_transform(map_to_base, self.factory, self.map_frame, self.base_frame, stamp_ns)
        self.writer.write("/tf", self.factory.new("TFMessage", transforms=[tr]), stamp_ns)

    def write_scan(self, scan: Scan, stamp_ns: int | None = None) -> None:
        """PointCloud2 with the Scan's columns: FLOAT32, except ``ring`` as UINT16 (as drivers do)."""
        stamp = scan.stamp_ns if stamp_ns is None else int(stamp_ns)
        header = make_header(stamp, self.lidar_frame, self.factory)
        fields, offset = [], 0
        for name in scan.fields:
            code = UINT16 if name == "ring" else FLOAT32
            fields.append(make_point_field(name, offset, code, 1, self.factory))
            offset += 2 if code == UINT16 else 4
        step = -(-offset // 4) * 4
        dtype = np.dtype({"names": list(scan.fields),
                          "formats": [np.uint16 if n == "ring" else np.float32 for n in scan.fields],
                          "offsets": [f.offset for f in fields], "itemsize": step})
        points = np.zeros(len(scan), dtype=dtype)
        for i, name in enumerate(scan.fields):
            col = scan.points[:, i]
            points[name] = np.clip(np.round(col), 0, 65535) if name == "ring" else col
        cloud = create_cloud(header, fields, points, point_step=step, msg_factory=self.factory)
        self.writer.write(self.lidar_topic, cloud, stamp)
        self.frames_written += 1

    def write_camera(self, camera: CameraFrame | tuple[str, np.ndarray, CameraModel],
                     stamp_ns: int) -> None:
        """Image (or CompressedImage) and its CameraInfo, both in the optical frame at ``stamp_ns``."""
        if isinstance(camera, CameraFrame):
            name, rgb, model = camera.name, camera.image, camera.calibration.camera
        else:
            name, rgb, model = camera
        header = make_header(int(stamp_ns), optical_frame(name), self.factory)
        image_topic, info_topic = self.camera_topics(name)
        info = model_to_camera_info(model, header, self.factory)
        self.writer.write(info_topic, info, stamp_ns)
        if self.compressed_images:
            img = rgb_to_compressed(rgb, header, self.factory, "jpeg", self.jpeg_quality)
        else:
            img = rgb_to_image(rgb, header, self.factory)
        self.writer.write(image_topic, img, stamp_ns)

    def write_label_classes(self, stamp_ns: int, vocabulary: str | None,
                            class_names: Sequence[str]) -> None:
        if self._classes_done:
            return
        payload = json.dumps({"vocabulary": vocabulary, "class_names": list(class_names)})
        self.writer.write(LABEL_CLASSES_TOPIC, self.factory.typestore.types["std_msgs/msg/String"](
            data=payload), stamp_ns, "std_msgs/msg/String", qos=latched_qos())
        self.writer.set_custom_data("clip2scene.label_classes", payload)
        self._classes_done = True

    def write_labels(self, labels: np.ndarray, stamp_ns: int) -> None:
        """Ground truth of the scan at ``stamp_ns``: -1 (ignore) is stored as 65535."""
        labels = np.asarray(labels).reshape(-1)
        if labels.size and (labels.min() < -1 or labels.max() >= UNLABELED):
            raise ValueError(f"labels must be in [-1, {UNLABELED - 1}]")
        values = np.where(labels < 0, UNLABELED, labels).astype(np.uint16)
        header = make_header(int(stamp_ns), self.lidar_frame, self.factory)
        fields = [make_point_field("label", 0, UINT16, 1, self.factory)]
        cloud = create_cloud(header, fields, values.reshape(-1, 1), msg_factory=self.factory)
        self.writer.write(LABELS_TOPIC, cloud, stamp_ns)
