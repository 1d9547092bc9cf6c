"""Launch the clip2scene_segmenter node (and optionally RViz).

    ros2 launch clip2scene_ros segment.launch.py checkpoint:=/models/c2s.pt \
        lidar_topic:=/lidar/points cameras:=front,left camera_transport:=compressed rviz:=true
    # a second LiDAR: another instance in its own namespace (outputs /right/clip2scene_segmenter/...)
    ros2 launch clip2scene_ros segment.launch.py namespace:=right lidar_topic:=/right/points ...

Parameters come from ``config`` (default: the installed config/segment.yaml); every argument
left empty keeps the file's value. ``cameras`` and ``class_names`` are comma-separated lists;
per-camera topics default to /<name>/image_raw[/compressed] and /<name>/camera_info, or are
set in the config file under ``camera.<name>``.

``fixed_frame`` is one world frame for the whole launch: the node's motion-compensated TF
lookups go through it (LiDAR pose at the sweep stamp, camera pose at the image stamp), and RViz
shows everything in it — RViz's fixed frame is the same tf2 "time travel" frame. A sensor frame
there (e.g. the LiDAR's) makes the node's lookups plain ones; ``auto`` / ``none`` only reach the
node (RViz then keeps its config's fixed frame). RViz's layout is rendered from
rviz/segment.rviz for this launch (`clip2scene_ros.rviz_config`): its input cloud, output topics
(namespace, node name, remaps), one overlay per camera and the label-id colour range.

``managed:=true`` starts the lifecycle variant (``clip2scene_segmenter_managed``), brought to
active by launch_ros when ``autostart:=true``; otherwise a lifecycle manager drives it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "clip2scene_ros"
NODE_NAME = "clip2scene_segmenter"

# (name, default, description). Names that are node parameters override config/segment.yaml
# when not empty (test/test_node_logic.py checks they match clip2scene_ros.node_config).
NODE_ARGUMENTS = (
    ("checkpoint", "", "deployable checkpoint (.pt)"),
    ("lidar_topic", "", "input PointCloud2 topic"),
    ("cameras", "", "comma-separated camera names, e.g. front,left (empty: as in config)"),
    ("device", "", "auto | cpu | cuda"),
    ("clip_weights", "", "CLIP weights file or open_clip tag (open vocabulary + camera fusion)"),
    ("class_names", "", "comma-separated open-vocabulary classes (empty: checkpoint's)"),
    ("filter_classes", "", "comma-separated classes of ~/filtered_points (empty: as in config)"),
    ("fixed_frame", "", "world frame (e.g. odom) of the node's motion-compensated TF lookups and "
                        "RViz's fixed frame; auto | none reach the node only (empty: as in the "
                        "config files)"),
)
LAUNCH_ARGUMENTS = (
    ("config", "", "parameters file (empty: the installed config/segment.yaml)"),
    ("namespace", "", "namespace of the node (one per LiDAR when running several)"),
    ("node_name", "clip2scene_segmenter", "name of the node"),
    ("labeled_points_topic", "", "remap ~/labeled_points to this topic (empty: no remap)"),
    ("remappings", "", "more remaps, 'from:=to' separated by ';' (e.g. ~/filtered_points:=/obstacles)"),
    ("managed", "false", "start the lifecycle node clip2scene_segmenter_managed"),
    ("autostart", "true", "managed only: configure and activate at start-up"),
    ("camera_transport", "", "raw | compressed, applied to every camera in 'cameras'"),
    ("use_sim_time", "false", "use /clock (bag playback with --clock)"),
    ("rviz", "false", "start RViz with rviz/segment.rviz"),
    ("rviz_config", "", "RViz config (empty: the installed rviz/segment.rviz)"),
)
NOT_A_FRAME = ("auto", "none")   # fixed_frame values that are node policies, not frames for RViz
LIST_ARGUMENTS = ("cameras", "class_names", "filter_classes")


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.replace(";", ",").split(",") if item.strip()]


def _is_true(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes", "on")


def _remappings(labeled_topic: str, more: str) -> list[tuple[str, str]]:
    remaps = [("~/labeled_points", labeled_topic.strip())] if labeled_topic.strip() else []
    for item in more.split(";"):
        if not item.strip():
            continue
        if ":=" not in item:
            raise ValueError(f"remappings: '{item}' is not 'from:=to'")
        source, target = (part.strip() for part in item.split(":=", 1))
        remaps.append((source, target))
    return remaps


def _class_count(checkpoint: str, class_names: str) -> int:
    """How many label ids the node will publish (0: unknown, RViz keeps its range)."""
    if class_names:
        return len(_split(class_names))
    if not checkpoint:
        return 0
    try:
        from clip2scene_core.checkpoint import load_checkpoint

        return len(load_checkpoint(checkpoint, map_location="cpu").vocabulary.class_names)
    except Exception:  # noqa: BLE001 - a bad checkpoint is the node's error to report, not RViz's
        return 0


def _rviz_file(arg, share: str, node_name: str, namespace: str,
               remaps: list[tuple[str, str]]) -> str:
    from clip2scene_ros.node_config import load_params_file
    from clip2scene_ros.rviz_config import render_rviz_config

    template = Path(arg("rviz_config") or f"{share}/rviz/segment.rviz").read_text()
    try:
        cfg = load_params_file(arg("config") or f"{share}/config/segment.yaml", node_name)
        lidar, cameras = cfg.lidar_topic, cfg.cameras
    except Exception:  # noqa: BLE001 - the node reports a bad params file; RViz shows defaults
        lidar, cameras = "", []
    lidar = arg("lidar_topic") or lidar
    cameras = _split(arg("cameras")) or cameras
    if lidar and not lidar.startswith("/") and namespace:
        lidar = f"/{namespace}/{lidar}"
    fixed = arg("fixed_frame")
    text = render_rviz_config(
        template, node_name=node_name, namespace=namespace, lidar_topic=lidar, cameras=cameras,
        fixed_frame=fixed if fixed not in NOT_A_FRAME else "",
        labeled_topic=dict(remaps).get("~/labeled_points", ""),
        num_classes=_class_count(arg("checkpoint"), arg("class_names")))
    handle = tempfile.NamedTemporaryFile("w", prefix=f"{node_name}_", suffix=".rviz", delete=False)
    with handle:
        handle.write(text)
    return handle.name


def _launch_setup(context, *args, **kwargs):
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    share = FindPackageShare(PACKAGE).perform(context)
    config = arg("config") or f"{share}/config/segment.yaml"
    overrides: dict[str, object] = {"use_sim_time": _is_true(arg("use_sim_time"))}
    for name, _, _ in NODE_ARGUMENTS:
        value = arg(name)
        if not value:
            continue   # keep the config file's value (an empty list cannot be typed anyway)
        # typed, so launch_ros does not YAML-parse them ("on" or "123" stay strings)
        overrides[name] = (ParameterValue(_split(value), value_type=List[str])
                           if name in LIST_ARGUMENTS else ParameterValue(value, value_type=str))
    transport = arg("camera_transport")
    if transport:
        for camera in _split(arg("cameras")):
            overrides[f"camera.{camera}.transport"] = ParameterValue(transport, value_type=str)
    node_name = arg("node_name") or NODE_NAME
    namespace = arg("namespace").strip("/")
    remaps = _remappings(arg("labeled_points_topic"), arg("remappings"))
    common = dict(package=PACKAGE, name=node_name, namespace=namespace, output="screen",
                  emulate_tty=True, parameters=[config, overrides], remappings=remaps)
    if _is_true(arg("managed")):
        actions = [LifecycleNode(executable=f"{NODE_NAME}_managed",
                                 autostart=_is_true(arg("autostart")), **common)]
    else:
        actions = [Node(executable=NODE_NAME, **common)]
    if _is_true(arg("rviz")):
        rviz_args = ["-d", _rviz_file(arg, share, node_name, namespace, remaps)]
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
                            arguments=rviz_args,
                            parameters=[{"use_sim_time": _is_true(arg("use_sim_time"))}]))
    return actions


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(name, default_value=default, description=description)
                for name, default, description in NODE_ARGUMENTS + LAUNCH_ARGUMENTS]
    return LaunchDescription(declared + [OpaqueFunction(function=_launch_setup)])
