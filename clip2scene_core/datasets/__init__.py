"""Dataset readers (nuScenes, SemanticKITTI, ScanNet, RELLIS-3D) that all return ``Sample``.

Readers are sequences (``len``, ``reader[i]``, iteration) that read files only when a sample is
asked for (contract: ``base.DatasetReader``); ``READERS`` (``registry.py``) maps the names
training configs use to them. Class-name lists give each label space in the order the paper uses.
"""
from .base import DatasetReader
from .classes import (CLASS_NAMES, IGNORE_INDEX, NUSCENES16_CLASSES, RELLIS3D_CLASSES,
                      SCANNET20_CLASSES, SEMANTICKITTI19_CLASSES, class_names_for,
                      nuscenes_lidarseg_to_16, nyu40_to_scannet20, rellis3d_to_index,
                      semantickitti_to_19)
from .nuscenes import NUSCENES_CAMERAS, NuScenesInfoReader, NuScenesReader, load_nuscenes_points
from .registry import READERS
from .rellis3d import RELLIS3D_NOTEBOOK_DISTORTION, Rellis3DReader, read_rellis_calibration
from .sample import Sample
from .scannet import ScanNetReader
from .semantickitti import (SemanticKittiReader, kitti_camera_calibration, parse_kitti_calib,
                            read_kitti_poses)

__all__ = [
    "DatasetReader", "READERS", "Sample", "CLASS_NAMES", "IGNORE_INDEX", "NUSCENES16_CLASSES",
    "SEMANTICKITTI19_CLASSES", "SCANNET20_CLASSES", "RELLIS3D_CLASSES", "class_names_for",
    "nuscenes_lidarseg_to_16", "semantickitti_to_19", "nyu40_to_scannet20", "rellis3d_to_index",
    "NUSCENES_CAMERAS", "NuScenesReader", "NuScenesInfoReader", "load_nuscenes_points",
    "SemanticKittiReader", "parse_kitti_calib", "kitti_camera_calibration", "read_kitti_poses",
    "ScanNetReader", "Rellis3DReader", "read_rellis_calibration", "RELLIS3D_NOTEBOOK_DISTORTION",
]
