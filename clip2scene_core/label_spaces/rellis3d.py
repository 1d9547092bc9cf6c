"""RELLIS-3D off-road ontology without "void", in ontology-id order.

Raw ids: the ontology ids (lower 16 bits of the SemanticKITTI-format label files); void (0)
and unused ids are ignored. No conventional colours: the palette generates them.
"""
from __future__ import annotations

from .base import LabelClass as C
from .base import LabelSpace

RELLIS3D = LabelSpace("rellis3d", raw_bits=16, classes=(
    C("dirt", "dirt", ("dirt", "dirt road", "bare soil"), raw=(1,)),
    C("grass", "grass", ("grass", "meadow"), raw=(3,)),
    C("tree", "tree", ("tree",), raw=(4,)),
    C("pole", "pole", ("pole", "post"), raw=(5,)),
    C("water", "water", ("water", "pond"), raw=(6,)),
    C("sky", "sky", ("sky",), raw=(7,)),
    C("vehicle", "vehicle", ("vehicle", "car", "truck"), raw=(8,)),
    C("object", "object", ("object", "box", "equipment"), raw=(9,)),
    C("asphalt", "asphalt", ("asphalt", "paved road"), raw=(10,)),
    C("building", "building", ("building", "shed"), raw=(12,)),
    C("log", "log", ("log", "fallen tree"), raw=(15,)),
    C("person", "person", ("person", "pedestrian"), raw=(17,)),
    C("fence", "fence", ("fence",), raw=(18,)),
    C("bush", "bush", ("bush", "shrub"), raw=(19,)),
    C("concrete", "concrete", ("concrete", "concrete pavement"), raw=(23,)),
    C("barrier", "barrier", ("barrier", "concrete barrier"), raw=(27,)),
    C("puddle", "puddle", ("puddle",), raw=(31,)),
    C("mud", "mud", ("mud",), raw=(33,)),
    C("rubble", "rubble", ("rubble", "rocks", "gravel pile"), raw=(34,)),
))
