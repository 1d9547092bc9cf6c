"""Label spaces of the benchmarks: class-name lists (paper order) and raw-id → class-index maps.

Index i of a ``*_CLASSES`` list is label i in ``Sample.labels``; -1 means "ignore". The CLIP
vocabulary presets (``clip2scene_core.clip.vocabulary``) use the same orders.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "NUSCENES16_CLASSES", "SEMANTICKITTI19_CLASSES", "SCANNET20_CLASSES", "RELLIS3D_CLASSES",
    "NUSCENES_LIDARSEG32_NAMES", "IGNORE_INDEX", "CLASS_NAMES", "class_names_for",
    "nuscenes_lidarseg_to_16", "semantickitti_to_19", "nyu40_to_scannet20", "rellis3d_to_index",
]

IGNORE_INDEX = -1

NUSCENES16_CLASSES: tuple[str, ...] = (
    "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
    "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
    "manmade", "vegetation",
)

SEMANTICKITTI19_CLASSES: tuple[str, ...] = (
    "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
    "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
    "vegetation", "trunk", "terrain", "pole", "traffic-sign",
)

# ScanNet v2 benchmark order (NYU40 ids 1 2 3 4 5 6 7 8 9 10 11 12 14 16 24 28 33 34 36 39).
SCANNET20_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
    "bathtub", "otherfurniture",
)

# RELLIS-3D ontology without "void", in ontology-id order (ids in _RELLIS3D_IDS).
RELLIS3D_CLASSES: tuple[str, ...] = (
    "dirt", "grass", "tree", "pole", "water", "sky", "vehicle", "object", "asphalt", "building",
    "log", "person", "fence", "bush", "concrete", "barrier", "puddle", "mud", "rubble",
)
_RELLIS3D_IDS = (1, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 17, 18, 19, 23, 27, 31, 33, 34)

# The 32 nuScenes-lidarseg classes, by their category.json ``index``.
NUSCENES_LIDARSEG32_NAMES: tuple[str, ...] = (
    "noise", "animal", "human.pedestrian.adult", "human.pedestrian.child",
    "human.pedestrian.construction_worker", "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer", "human.pedestrian.stroller",
    "human.pedestrian.wheelchair", "movable_object.barrier", "movable_object.debris",
    "movable_object.pushable_pullable", "movable_object.trafficcone",
    "static_object.bicycle_rack", "vehicle.bicycle", "vehicle.bus.bendy", "vehicle.bus.rigid",
    "vehicle.car", "vehicle.construction", "vehicle.emergency.ambulance",
    "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer", "vehicle.truck",
    "flat.driveable_surface", "flat.other", "flat.sidewalk", "flat.terrain", "static.manmade",
    "static.other", "static.vegetation", "vehicle.ego",
)

# lidarseg index → 16-class name, as in the nuScenes-lidarseg benchmark; the rest is ignored.
_NUSCENES_32_TO_16 = {
    9: "barrier", 14: "bicycle", 15: "bus", 16: "bus", 17: "car", 18: "construction_vehicle",
    21: "motorcycle", 2: "pedestrian", 3: "pedestrian", 4: "pedestrian", 6: "pedestrian",
    12: "traffic_cone", 22: "trailer", 23: "truck", 24: "driveable_surface", 25: "other_flat",
    26: "sidewalk", 27: "terrain", 28: "manmade", 30: "vegetation",
}

# SemanticKITTI raw id → 19-class name (semantic-kitti.yaml learning_map; moving → static class).
_SEMANTICKITTI_TO_19 = {
    10: "car", 11: "bicycle", 13: "other-vehicle", 15: "motorcycle", 16: "other-vehicle",
    18: "truck", 20: "other-vehicle", 30: "person", 31: "bicyclist", 32: "motorcyclist",
    40: "road", 44: "parking", 48: "sidewalk", 49: "other-ground", 50: "building", 51: "fence",
    60: "road", 70: "vegetation", 71: "trunk", 72: "terrain", 80: "pole", 81: "traffic-sign",
    252: "car", 253: "bicyclist", 254: "person", 255: "motorcyclist", 256: "other-vehicle",
    257: "other-vehicle", 258: "truck", 259: "other-vehicle",
}

_NYU40_SCANNET20_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "nuscenes16": NUSCENES16_CLASSES,
    "semantickitti19": SEMANTICKITTI19_CLASSES,
    "scannet20": SCANNET20_CLASSES,
    "rellis3d": RELLIS3D_CLASSES,
}


def class_names_for(vocabulary_name: str) -> tuple[str, ...]:
    """Class names of a label space by name; KeyError lists the known names."""
    try:
        return CLASS_NAMES[vocabulary_name]
    except KeyError:
        raise KeyError(f"unknown label space '{vocabulary_name}'; known: {sorted(CLASS_NAMES)}") from None


def _lut(size: int, pairs: dict[int, int]) -> np.ndarray:
    lut = np.full(size, IGNORE_INDEX, dtype=np.int64)
    for raw, idx in pairs.items():
        lut[raw] = idx
    return lut


_LUT_NUSCENES = _lut(256, {k: NUSCENES16_CLASSES.index(v) for k, v in _NUSCENES_32_TO_16.items()})
_LUT_SEMANTICKITTI = _lut(1 << 16, {k: SEMANTICKITTI19_CLASSES.index(v)
                                    for k, v in _SEMANTICKITTI_TO_19.items()})
_LUT_NYU40 = _lut(1 << 16, {raw: i for i, raw in enumerate(_NYU40_SCANNET20_IDS)})
_LUT_RELLIS = _lut(1 << 16, {raw: i for i, raw in enumerate(_RELLIS3D_IDS)})


def nuscenes_lidarseg_to_16(raw: np.ndarray) -> np.ndarray:
    """uint8 lidarseg indices (0–31) → nuScenes-16 indices, -1 for noise/ego/unmapped classes."""
    return _LUT_NUSCENES[np.asarray(raw).astype(np.int64) & 0xFF]


def semantickitti_to_19(raw: np.ndarray) -> np.ndarray:
    """.label words (semantic id in the lower 16 bits) → SemanticKITTI-19 indices, -1 = ignore."""
    return _LUT_SEMANTICKITTI[np.asarray(raw).astype(np.int64) & 0xFFFF]


def nyu40_to_scannet20(raw: np.ndarray) -> np.ndarray:
    """NYU40 ids → ScanNet-20 indices, -1 for unannotated and the 20 unused NYU40 classes."""
    return _LUT_NYU40[np.asarray(raw).astype(np.int64) & 0xFFFF]


def rellis3d_to_index(raw: np.ndarray) -> np.ndarray:
    """RELLIS-3D ontology ids (lower 16 bits) → index into RELLIS3D_CLASSES, -1 for void."""
    return _LUT_RELLIS[np.asarray(raw).astype(np.int64) & 0xFFFF]
