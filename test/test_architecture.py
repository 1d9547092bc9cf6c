"""The layering the package promises: the core never imports ROS, the node holds no torch."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROS_MODULES = {"rclpy", "rosbags", "sensor_msgs", "std_msgs", "geometry_msgs", "tf2_ros",
               "tf2_msgs", "message_filters", "cv_bridge", "sensor_msgs_py", "builtin_interfaces",
               "diagnostic_msgs", "launch", "launch_ros", "clip2scene_ros", "training"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "clip2scene_core").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_core_has_no_ros_import(path):
    assert not (_imports(path) & ROS_MODULES), f"{path} imports {_imports(path) & ROS_MODULES}"


@pytest.mark.parametrize("name", ["node.py", "pipeline.py", "sync.py", "diagnostics.py",
                                  "node_config.py", "pointcloud2.py", "image.py", "tf.py", "msgs.py"])
def test_ros_glue_has_no_torch(name):
    assert "torch" not in _imports(ROOT / "clip2scene_ros" / name)


def test_only_the_node_imports_rclpy():
    users = {p.name for p in (ROOT / "clip2scene_ros").glob("*.py") if "rclpy" in _imports(p)}
    assert users <= {"node.py"}, users
