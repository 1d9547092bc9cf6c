"""What the ``label`` values of the output clouds mean, for nodes downstream.

The node publishes the id → class-name list on latched (transient-local) topics at start-up
and after every vocabulary change: ``~/label_info`` as ``vision_msgs/LabelInfo`` where
vision_msgs is installed, and always ``~/label_classes`` as ``std_msgs/String`` holding the
JSON built here (names, colours, the unlabelled value), which needs no extra message package
and is the documented fallback. Pure: no rclpy, so the replay tool and tests use it too.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from clip2scene_core.label_spaces import UNLABELED
from clip2scene_core.palette import palette_for

from .output_schema import LABEL_FIELD

#: version of the JSON layout below; bump when a key changes meaning
LABEL_CLASSES_FORMAT = 1


def label_classes_json(class_names: Sequence[str], colors: np.ndarray | None = None) -> str:
    """``{"format", "class_names", "colors", "unlabeled", "field"}`` as JSON text.

    ``class_names[i]`` is the class of ``label == i``; ``colors[i]`` its [r, g, b] in the
    ``rgb`` field; ``unlabeled`` is the label of points without a class.
    """
    names = [str(n) for n in class_names]
    colors = palette_for(names) if colors is None else np.asarray(colors, dtype=np.uint8)
    if len(colors) != len(names):
        raise ValueError(f"{len(colors)} colours for {len(names)} classes")
    return json.dumps({"format": LABEL_CLASSES_FORMAT, "class_names": names,
                       "colors": [[int(c) for c in rgb] for rgb in colors],
                       "unlabeled": UNLABELED, "field": LABEL_FIELD})


def parse_label_classes(text: str) -> dict[str, Any]:
    """Inverse of `label_classes_json` (for consumers and tests); ValueError when malformed."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("class_names"), list):
        raise ValueError("label classes JSON needs a 'class_names' list")
    return data


def label_info_entries(class_names: Sequence[str]) -> list[tuple[int, str]]:
    """(class_id, class_name) pairs of a ``vision_msgs/LabelInfo`` class_map."""
    if len(class_names) > 65535:
        raise ValueError("vision_msgs/VisionClass ids are uint16: too many classes")
    return [(i, str(name)) for i, name in enumerate(class_names)]
