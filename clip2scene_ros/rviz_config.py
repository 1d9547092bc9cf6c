"""The RViz layout of a launch: rviz/segment.rviz with this launch's frame, topics and labels.

A static .rviz file cannot follow launch arguments, so segment.launch.py renders the shipped
file through `render_rviz_config` into a temporary file: the fixed frame, the input cloud's
topic, the node's output topics under its namespace/name (every display of ``labeled_points``,
the query-relevance heat map too, whose fixed 0 … 1 range is left as it is), one image display
per camera, and the label-id display's intensity range covering the vocabulary (0 … K-1).
Pure (PyYAML only).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import yaml

from clip2scene_core.errors import ConfigError

LABELED = "labeled_points"


def node_topic(namespace: str, node_name: str, name: str) -> str:
    """The absolute topic of ``~/<name>`` for a node in ``namespace``."""
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    return f"{ns}/{node_name}/{name}"


def _displays(cfg: dict) -> list[dict]:
    try:
        return cfg["Visualization Manager"]["Displays"]
    except (KeyError, TypeError):
        raise ConfigError("RViz config has no 'Visualization Manager: Displays' list") from None


def render_rviz_config(template: str, *, node_name: str, namespace: str = "",
                       fixed_frame: str = "", lidar_topic: str = "", cameras: Sequence[str] = (),
                       num_classes: int = 0, labeled_topic: str = "") -> str:
    """RViz YAML for one launch; empty arguments keep the template's values."""
    cfg = yaml.safe_load(template)
    displays = _displays(cfg)
    if fixed_frame:
        cfg["Visualization Manager"]["Global Options"]["Fixed Frame"] = fixed_frame
    out_topic = labeled_topic or node_topic(namespace, node_name, LABELED)
    image_template = None
    kept: list[dict[str, Any]] = []
    for display in displays:
        topic = display.get("Topic", {})
        value = topic.get("Value", "") if isinstance(topic, dict) else ""
        if display.get("Class") == "rviz_default_plugins/Image" and "/overlay/" in value:
            image_template = image_template or display   # re-made per camera below
            continue
        if value.endswith("/" + LABELED):
            topic["Value"] = out_topic
            if display.get("Channel Name") == "label" and num_classes > 0:
                display["Autocompute Intensity Bounds"] = False
                display["Min Intensity"] = 0
                display["Max Intensity"] = max(1, int(num_classes) - 1)
        elif display.get("Name") == "Input cloud" and lidar_topic:
            topic["Value"] = lidar_topic
        kept.append(display)
    for camera in cameras:
        if image_template is None:
            break
        display = copy.deepcopy(image_template)
        display["Name"] = f"Overlay {camera}"
        display["Topic"]["Value"] = node_topic(namespace, node_name, f"overlay/{camera}")
        kept.append(display)
    cfg["Visualization Manager"]["Displays"] = kept
    return yaml.safe_dump(cfg, sort_keys=False)
