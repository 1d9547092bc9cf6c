"""Label spaces as the dataset readers see them: class-name lists and raw id → class index.

Views of the records in ``clip2scene_core.label_spaces`` (the one source of names, prompts,
colours and raw-id maps). Index i of a ``*_CLASSES`` list is label i in ``Sample.labels``;
``IGNORE_INDEX`` (-1) means "ignore".
"""
from __future__ import annotations

import numpy as np

from ..label_spaces import (IGNORE_INDEX, LABEL_SPACES, LIDARSEG32_NAMES, NUSCENES16, RELLIS3D,
                            SCANNET20, SEMANTICKITTI19, label_space)

__all__ = [
    "NUSCENES16_CLASSES", "SEMANTICKITTI19_CLASSES", "SCANNET20_CLASSES", "RELLIS3D_CLASSES",
    "NUSCENES_LIDARSEG32_NAMES", "IGNORE_INDEX", "CLASS_NAMES", "class_names_for",
    "nuscenes_lidarseg_to_16", "semantickitti_to_19", "nyu40_to_scannet20", "rellis3d_to_index",
]

NUSCENES16_CLASSES: tuple[str, ...] = NUSCENES16.class_names
SEMANTICKITTI19_CLASSES: tuple[str, ...] = SEMANTICKITTI19.class_names
SCANNET20_CLASSES: tuple[str, ...] = SCANNET20.class_names
RELLIS3D_CLASSES: tuple[str, ...] = RELLIS3D.class_names
NUSCENES_LIDARSEG32_NAMES: tuple[str, ...] = LIDARSEG32_NAMES

#: label-space name → dataset class names (``Sample.class_names`` of ``vocabulary_name``)
CLASS_NAMES: dict[str, tuple[str, ...]] = {name: s.class_names for name, s in LABEL_SPACES.items()}


def class_names_for(vocabulary_name: str) -> tuple[str, ...]:
    """Class names of a label space by name; ConfigError lists the known names."""
    return label_space(vocabulary_name).class_names


def nuscenes_lidarseg_to_16(raw: np.ndarray) -> np.ndarray:
    """uint8 lidarseg indices (0–31) → nuScenes-16 indices, -1 for noise/ego/unmapped classes."""
    return NUSCENES16.to_index(raw)


def semantickitti_to_19(raw: np.ndarray) -> np.ndarray:
    """.label words (semantic id in the lower 16 bits) → SemanticKITTI-19 indices, -1 = ignore."""
    return SEMANTICKITTI19.to_index(raw)


def nyu40_to_scannet20(raw: np.ndarray) -> np.ndarray:
    """NYU40 ids → ScanNet-20 indices, -1 for unannotated and the 20 unused NYU40 classes."""
    return SCANNET20.to_index(raw)


def rellis3d_to_index(raw: np.ndarray) -> np.ndarray:
    """RELLIS-3D ontology ids (lower 16 bits) → index into RELLIS3D_CLASSES, -1 for void."""
    return RELLIS3D.to_index(raw)
