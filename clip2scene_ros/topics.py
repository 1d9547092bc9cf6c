"""Which topics of a bag feed the pipeline: the LiDAR, the cameras, TF and ground truth.

Topic discovery for `clip2scene_ros.frames.FrameSource` (the replay tool and training's rosbag
reader): the node's parameters win when the bag has those topics, otherwise the bag's own
topic table decides. Topics this package writes (replay output, dataset ground truth) are
never taken for inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from clip2scene_core.errors import ConfigError

from .bag import (CAMERA_INFO, COMPRESSED_IMAGE, IMAGE, LABEL_CLASSES_TOPIC, LABELS_TOPIC,
                  POINTCLOUD2, TF_MESSAGE)
from .node_config import NODE_NAME, CameraConfig, NodeConfig

log = logging.getLogger("clip2scene.frames")

#: the replay tool writes under the node's namespace, as the node publishes
OUTPUT_NS = f"/{NODE_NAME}"
OUTPUT_TOPIC = f"{OUTPUT_NS}/labeled_points"


@dataclass
class InputTopics:
    """Which input topics feed the pipeline (``gt`` None: no ground truth is read)."""

    lidar: str
    cameras: list[CameraConfig] = field(default_factory=list)
    tf: list[str] = field(default_factory=list)
    tf_static: list[str] = field(default_factory=list)
    gt: str | None = None
    gt_classes: str | None = None


def _namespace(topic: str) -> str:
    """``/cam_front/image_raw/compressed`` → ``/cam_front`` (the camera's namespace)."""
    parts = topic.rstrip("/").split("/")
    if parts[-1] == "compressed":
        parts = parts[:-1]
    return "/".join(parts[:-1]) or "/"


def _ours(topic: str) -> bool:
    """A topic this package writes (replay output, dataset ground truth): never an input."""
    return topic.startswith(OUTPUT_NS + "/") or topic in (LABELS_TOPIC, LABEL_CLASSES_TOPIC)


def discover_topics(topics: dict[str, str], cfg: NodeConfig, *, lidar_topic: str | None = None,
                    use_cameras: bool = True, gt_topic: str | None = None) -> InputTopics:
    """Pick the pipeline's inputs from a bag's topic table.

    The node's parameters win when the bag has those topics; otherwise the single
    PointCloud2 topic (besides ground truth and earlier replay output) and every image topic
    with a CameraInfo in the same namespace (camera name = namespace's last part).
    """
    lidar = lidar_topic or (cfg.lidar_topic if cfg.lidar_topic in topics else None)
    if lidar is None:
        clouds = [t for t, typ in topics.items() if typ == POINTCLOUD2 and not _ours(t)]
        if len(clouds) != 1:
            raise ConfigError(f"cannot tell the LiDAR topic: PointCloud2 topics are {sorted(clouds)}; "
                              "pass --lidar-topic")
        lidar = clouds[0]
    elif lidar not in topics:
        raise ConfigError(f"LiDAR topic {lidar} is not in the bag (topics: {sorted(topics)})")
    cameras: list[CameraConfig] = []
    if use_cameras and cfg.cameras:
        for cam in cfg.camera_list:
            if cam.image_topic in topics and cam.info_topic in topics:
                cameras.append(cam)
            else:
                log.warning("camera %s: %s / %s not in the bag, left out", cam.name,
                            cam.image_topic, cam.info_topic)
    elif use_cameras:
        cameras = _cameras_by_namespace(topics)
    tf = [t for t, typ in topics.items() if typ == TF_MESSAGE and "static" not in t]
    tf_static = [t for t, typ in topics.items() if typ == TF_MESSAGE and "static" in t]
    gt = gt_topic if gt_topic else (LABELS_TOPIC if LABELS_TOPIC in topics else None)
    if gt is not None and gt not in topics:
        raise ConfigError(f"ground-truth topic {gt} is not in the bag")
    classes = LABEL_CLASSES_TOPIC if LABEL_CLASSES_TOPIC in topics else None
    return InputTopics(lidar, cameras, tf, tf_static, gt, classes)


def _cameras_by_namespace(topics: dict[str, str]) -> list[CameraConfig]:
    """Every Image / CompressedImage topic with a CameraInfo in its namespace."""
    infos = {_namespace(t): t for t, typ in topics.items() if typ == CAMERA_INFO and not _ours(t)}
    cameras: list[CameraConfig] = []
    for t, typ in sorted(topics.items()):
        if typ not in (IMAGE, COMPRESSED_IMAGE) or _ours(t):
            continue
        ns = _namespace(t)
        if ns not in infos:
            continue
        name = "".join(c if c.isalnum() else "_" for c in ns.strip("/").split("/")[-1]) or "camera"
        if any(c.name == name for c in cameras):
            continue  # raw and compressed of the same camera: keep the first (raw sorts first)
        cameras.append(CameraConfig(name, t, infos[ns],
                                    "compressed" if typ == COMPRESSED_IMAGE else "raw"))
    return cameras
