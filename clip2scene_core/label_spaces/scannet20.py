"""ScanNet v2, the 20 classes of its benchmark (``VALID_CLASS_IDS`` order).

Raw ids: NYU40 ids 1–12, 14, 16, 24, 28, 33, 34, 36, 39; unannotated and the other 20 NYU40
classes are ignored. No conventional colours: the palette generates them.
"""
from __future__ import annotations

from .base import LabelClass as C
from .base import LabelSpace

SCANNET20 = LabelSpace("scannet20", raw_bits=16, classes=(
    C("wall", "wall", ("wall",), raw=(1,)),
    C("floor", "floor", ("floor", "carpet", "rug"), raw=(2,)),
    C("cabinet", "cabinet", ("cabinet", "cupboard"), raw=(3,)),
    C("bed", "bed", ("bed",), raw=(4,)),
    C("chair", "chair", ("chair", "office chair", "armchair"), raw=(5,)),
    C("sofa", "sofa", ("sofa", "couch"), raw=(6,)),
    C("table", "table", ("table", "coffee table", "dining table"), raw=(7,)),
    C("door", "door", ("door",), raw=(8,)),
    C("window", "window", ("window",), raw=(9,)),
    C("bookshelf", "bookshelf", ("bookshelf", "bookcase"), raw=(10,)),
    C("picture", "picture", ("picture", "painting", "framed picture"), raw=(11,)),
    C("counter", "counter", ("counter", "kitchen counter"), raw=(12,)),
    C("desk", "desk", ("desk",), raw=(14,)),
    C("curtain", "curtain", ("curtain", "drape"), raw=(16,)),
    C("refrigerator", "refrigerator", ("refrigerator", "fridge"), raw=(24,)),
    C("shower curtain", "shower curtain", ("shower curtain",), raw=(28,)),
    C("toilet", "toilet", ("toilet",), raw=(33,)),
    C("sink", "sink", ("sink",), raw=(34,)),
    C("bathtub", "bathtub", ("bathtub", "bath tub"), raw=(36,)),
    C("otherfurniture", "other furniture", ("furniture", "shelf", "stool", "nightstand"), raw=(39,)),
))
