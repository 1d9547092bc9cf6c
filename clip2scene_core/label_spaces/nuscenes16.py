"""nuScenes-lidarseg, the 16 classes of its segmentation benchmark.

Colours: the devkit colormap. Raw ids: the lidarseg ``category.json`` index (``raw_names``);
noise, animal, debris, pushable/pullable, bicycle rack, ambulance, police car, static.other
and ego are ignored, as in the benchmark. Prompts follow CLIP2Scene / MaskCLIP+: a class whose
name is a poor caption ("manmade", "other flat") is described by the things it contains.
"""
from __future__ import annotations

from .base import LabelClass as C
from .base import LabelSpace

#: The 32 nuScenes-lidarseg classes, by their category.json ``index``.
LIDARSEG32_NAMES: tuple[str, ...] = (
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

NUSCENES16 = LabelSpace("nuscenes16", raw_bits=8, raw_names=LIDARSEG32_NAMES, classes=(
    C("barrier", "barrier", ("barrier", "barricade", "road barrier", "jersey barrier"),
      (112, 128, 144), raw=(9,)),
    C("bicycle", "bicycle", ("bicycle", "bike"), (220, 20, 60), raw=(14,)),
    C("bus", "bus", ("bus", "city bus", "bendy bus"), (255, 127, 80), raw=(15, 16)),
    C("car", "car", ("car", "sedan", "suv", "van"), (255, 158, 0), raw=(17,)),
    C("construction_vehicle", "construction vehicle",
      ("construction vehicle", "bulldozer", "excavator", "concrete mixer", "crane", "dump truck"),
      (233, 150, 70), raw=(18,)),
    C("motorcycle", "motorcycle", ("motorcycle", "scooter", "motorbike"), (255, 61, 99), raw=(21,)),
    C("pedestrian", "pedestrian", ("pedestrian", "person", "people walking"), (0, 0, 230),
      raw=(2, 3, 4, 6)),
    C("traffic_cone", "traffic cone", ("traffic cone", "road cone"), (47, 79, 79), raw=(12,)),
    C("trailer", "trailer", ("trailer", "semi trailer", "cargo container", "shipping container"),
      (255, 140, 0), raw=(22,)),
    C("truck", "truck", ("truck", "pickup truck", "lorry", "box truck"), (255, 99, 71), raw=(23,)),
    C("driveable_surface", "driveable surface", ("road", "street", "asphalt road", "highway"),
      (0, 207, 191), raw=(24,), aliases=("drivable surface", "flat.driveable_surface")),
    C("other_flat", "other flat", ("curb", "traffic island", "traffic median", "rail track"),
      (175, 0, 75), raw=(25,)),
    C("sidewalk", "sidewalk", ("sidewalk", "pavement", "footpath"), (75, 0, 75), raw=(26,)),
    C("terrain", "terrain", ("grass", "lawn", "soil", "terrain", "gravel"), (112, 180, 60), raw=(27,)),
    C("manmade", "manmade",
      ("building", "wall", "pole", "fence", "traffic sign", "street light", "awning"),
      (222, 184, 135), raw=(28,), aliases=("static.manmade",)),
    C("vegetation", "vegetation", ("tree", "tree trunk", "bush", "shrub", "hedge", "vegetation"),
      (0, 175, 0), raw=(30,), aliases=("static.vegetation",)),
))
