"""The layering the package promises: the core never imports ROS, the node holds no torch."""
from __future__ import annotations

import ast
import sys
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


@pytest.mark.parametrize("name", ["node.py", "pipeline.py", "sync.py", "diagnostics.py", "label_info.py", "rviz_config.py",
                                  "node_config.py", "pointcloud2.py", "image.py", "tf.py", "msgs.py"])
def test_ros_glue_has_no_torch(name):
    assert "torch" not in _imports(ROOT / "clip2scene_ros" / name)


def test_only_the_node_imports_rclpy():
    users = {p.name for p in (ROOT / "clip2scene_ros").glob("*.py") if "rclpy" in _imports(p)}
    assert users <= {"node.py"}, users


def test_package_xml_lists_what_the_node_imports():
    """package.xml's ROS dependencies are exactly the ROS packages the code imports."""
    import re
    import xml.etree.ElementTree as ET

    depends = {e.text for e in ET.parse(ROOT / "package.xml").getroot()
               if e.tag == "exec_depend" and not e.text.startswith("python3-")}
    node_src = (ROOT / "clip2scene_ros" / "node.py").read_text()
    imported = {name for name in _imports(ROOT / "clip2scene_ros" / "node.py")
                if name not in sys.stdlib_module_names and name not in ("clip2scene_core", "clip2scene_ros")}
    optional = {m.split(".")[0] for m in re.findall(r'optional_module\("([\w.]+)"\)', node_src)}
    launch = _imports(ROOT / "launch" / "segment.launch.py") & {"launch", "launch_ros"}
    # rclpy.lifecycle needs lifecycle_msgs; builtin_interfaces carries the stamps; messages
    # built by name through MessageFactory (TransformStamped) need geometry_msgs; the Python
    # module tf2_ros comes from the tf2_ros_py package; RViz is started by the launch file
    expected = (imported | optional | launch | {"lifecycle_msgs", "builtin_interfaces",
                                                "geometry_msgs", "rviz2"})
    expected = {"tf2_ros_py" if name == "tf2_ros" else name for name in expected}
    assert depends == expected
