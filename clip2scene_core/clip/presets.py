"""Class lists of the benchmarks CLIP2Scene reports, with the text names used for each class.

Order = the benchmark's training label order (index i is class i of the label mapping):
nuScenes-lidarseg 16 (labels 1..16 after mapping), SemanticKITTI 19 (learning map 1..19),
ScanNet 20 (VALID_CLASS_IDS order), RELLIS-3D (ontology ids without void) — the orders of
``datasets/classes.py``; names here use spaces ("construction vehicle") since people read
them. Synonyms follow CLIP2Scene / MaskCLIP+: a class whose name is a poor caption
("manmade", "other flat") is described by the things it contains. A class's text embedding
averages over all its names (see ``text_bank``).
"""
from __future__ import annotations

# Each entry: (class name, names used in prompts). The class name itself is only
# prompted when it appears in the list.
NUSCENES16: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("barrier", ("barrier", "barricade", "road barrier", "jersey barrier")),
    ("bicycle", ("bicycle", "bike")),
    ("bus", ("bus", "city bus", "bendy bus")),
    ("car", ("car", "sedan", "suv", "van")),
    ("construction vehicle", ("construction vehicle", "bulldozer", "excavator", "concrete mixer",
                              "crane", "dump truck")),
    ("motorcycle", ("motorcycle", "scooter", "motorbike")),
    ("pedestrian", ("pedestrian", "person", "people walking")),
    ("traffic cone", ("traffic cone", "road cone")),
    ("trailer", ("trailer", "semi trailer", "cargo container", "shipping container")),
    ("truck", ("truck", "pickup truck", "lorry", "box truck")),
    ("driveable surface", ("road", "street", "asphalt road", "highway")),
    ("other flat", ("curb", "traffic island", "traffic median", "rail track")),
    ("sidewalk", ("sidewalk", "pavement", "footpath")),
    ("terrain", ("grass", "lawn", "soil", "terrain", "gravel")),
    ("manmade", ("building", "wall", "pole", "fence", "traffic sign", "street light", "awning")),
    ("vegetation", ("tree", "tree trunk", "bush", "shrub", "hedge", "vegetation")),
)

SEMANTICKITTI19: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("car", ("car", "sedan")),
    ("bicycle", ("bicycle", "bike")),
    ("motorcycle", ("motorcycle", "motorbike", "scooter")),
    ("truck", ("truck", "lorry")),
    ("other vehicle", ("bus", "trailer", "van", "tram", "caravan")),
    ("person", ("person", "pedestrian")),
    ("bicyclist", ("bicyclist", "cyclist", "person riding a bicycle")),
    ("motorcyclist", ("motorcyclist", "person riding a motorcycle")),
    ("road", ("road", "street", "asphalt road")),
    ("parking", ("parking lot", "parking space")),
    ("sidewalk", ("sidewalk", "pavement")),
    ("other ground", ("traffic island", "curb", "median strip")),
    ("building", ("building", "house", "wall")),
    ("fence", ("fence", "railing", "guard rail")),
    ("vegetation", ("tree", "bush", "hedge", "vegetation")),
    ("trunk", ("tree trunk", "trunk")),
    ("terrain", ("grass", "lawn", "soil", "terrain")),
    ("pole", ("pole", "lamp post", "street light")),
    ("traffic sign", ("traffic sign", "road sign", "stop sign")),
)

SCANNET20: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("wall", ("wall",)),
    ("floor", ("floor", "carpet", "rug")),
    ("cabinet", ("cabinet", "cupboard")),
    ("bed", ("bed",)),
    ("chair", ("chair", "office chair", "armchair")),
    ("sofa", ("sofa", "couch")),
    ("table", ("table", "coffee table", "dining table")),
    ("door", ("door",)),
    ("window", ("window",)),
    ("bookshelf", ("bookshelf", "bookcase")),
    ("picture", ("picture", "painting", "framed picture")),
    ("counter", ("counter", "kitchen counter")),
    ("desk", ("desk",)),
    ("curtain", ("curtain", "drape")),
    ("refrigerator", ("refrigerator", "fridge")),
    ("shower curtain", ("shower curtain",)),
    ("toilet", ("toilet",)),
    ("sink", ("sink",)),
    ("bathtub", ("bathtub", "bath tub")),
    ("other furniture", ("furniture", "shelf", "stool", "nightstand")),
)

# RELLIS-3D off-road ontology without "void", in ontology-id order.
RELLIS3D: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dirt", ("dirt", "dirt road", "bare soil")),
    ("grass", ("grass", "meadow")),
    ("tree", ("tree",)),
    ("pole", ("pole", "post")),
    ("water", ("water", "pond")),
    ("sky", ("sky",)),
    ("vehicle", ("vehicle", "car", "truck")),
    ("object", ("object", "box", "equipment")),
    ("asphalt", ("asphalt", "paved road")),
    ("building", ("building", "shed")),
    ("log", ("log", "fallen tree")),
    ("person", ("person", "pedestrian")),
    ("fence", ("fence",)),
    ("bush", ("bush", "shrub")),
    ("concrete", ("concrete", "concrete pavement")),
    ("barrier", ("barrier", "concrete barrier")),
    ("puddle", ("puddle",)),
    ("mud", ("mud",)),
    ("rubble", ("rubble", "rocks", "gravel pile")),
)

PRESETS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "nuscenes16": NUSCENES16,
    "semantickitti19": SEMANTICKITTI19,
    "scannet20": SCANNET20,
    "rellis3d": RELLIS3D,
}
