"""Launch the clip2scene_segmenter node (and optionally RViz).

    ros2 launch clip2scene_ros segment.launch.py checkpoint:=/models/c2s.pt \
        lidar_topic:=/lidar/points cameras:=front,left camera_transport:=compressed rviz:=true

Parameters come from ``config`` (default: the installed config/segment.yaml); every argument
left empty keeps the file's value. ``cameras`` and ``class_names`` are comma-separated lists;
per-camera topics default to /<name>/image_raw[/compressed] and /<name>/camera_info, or are
set in the config file under ``camera.<name>``.

``fixed_frame`` is one world frame for the whole launch: the node's motion-compensated TF
lookups go through it (LiDAR pose at the sweep stamp, camera pose at the image stamp), and RViz
shows everything in it — RViz's fixed frame is the same tf2 "time travel" frame. A sensor frame
there (e.g. the LiDAR's) makes the node's lookups plain ones; ``auto`` / ``none`` only reach the
node (RViz then keeps its config's fixed frame).
"""
from __future__ import annotations

from typing import List

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
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
    ("fixed_frame", "", "world frame (e.g. odom) of the node's motion-compensated TF lookups and "
                        "RViz's fixed frame; auto | none reach the node only (empty: as in the "
                        "config files)"),
)
LAUNCH_ARGUMENTS = (
    ("config", "", "parameters file (empty: the installed config/segment.yaml)"),
    ("camera_transport", "", "raw | compressed, applied to every camera in 'cameras'"),
    ("use_sim_time", "false", "use /clock (bag playback with --clock)"),
    ("rviz", "false", "start RViz with rviz/segment.rviz"),
    ("rviz_config", "", "RViz config (empty: the installed rviz/segment.rviz)"),
)
NOT_A_FRAME = ("auto", "none")   # fixed_frame values that are node policies, not frames for RViz
LIST_ARGUMENTS = ("cameras", "class_names")


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.replace(";", ",").split(",") if item.strip()]


def _is_true(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes", "on")


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
    actions = [Node(package=PACKAGE, executable=NODE_NAME, name=NODE_NAME, output="screen",
                    emulate_tty=True, parameters=[config, overrides])]
    if _is_true(arg("rviz")):
        rviz_args = ["-d", arg("rviz_config") or f"{share}/rviz/segment.rviz"]
        if arg("fixed_frame") and arg("fixed_frame") not in NOT_A_FRAME:
            rviz_args += ["-f", arg("fixed_frame")]
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
                            arguments=rviz_args,
                            parameters=[{"use_sim_time": _is_true(arg("use_sim_time"))}]))
    return actions


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(name, default_value=default, description=description)
                for name, default, description in NODE_ARGUMENTS + LAUNCH_ARGUMENTS]
    return LaunchDescription(declared + [OpaqueFunction(function=_launch_setup)])
