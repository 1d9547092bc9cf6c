"""Label spaces: one record per benchmark (class names, prompt names, colours, raw id → index),
the one class-name matcher and the one ignore label.

``IGNORE_INDEX`` (-1) is "no class" in memory; ``UNLABELED`` (65535) is the same in unsigned
label fields on the wire. Add a labelled dataset's classes as one module defining a
``LabelSpace`` plus one entry in ``registry._SPACES``.
"""
from .base import IGNORE_INDEX, UNLABELED, LabelClass, LabelSpace, spelling_key
from .matching import class_key, class_map, match_classes, remap_labels
from .nuscenes16 import LIDARSEG32_NAMES, NUSCENES16
from .registry import LABEL_SPACES, label_space
from .rellis3d import RELLIS3D
from .scannet20 import SCANNET20
from .semantickitti19 import SEMANTICKITTI19

__all__ = [
    "IGNORE_INDEX", "UNLABELED", "LabelClass", "LabelSpace", "LABEL_SPACES", "label_space",
    "spelling_key", "class_key", "match_classes", "class_map", "remap_labels",
    "NUSCENES16", "SEMANTICKITTI19", "SCANNET20", "RELLIS3D", "LIDARSEG32_NAMES",
]
