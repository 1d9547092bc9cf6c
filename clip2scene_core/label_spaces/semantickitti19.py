"""SemanticKITTI, the 19 classes of its benchmark.

Colours: ``semantic-kitti.yaml`` ``color_map`` (BGR there, RGB here). Raw ids: the lower 16
bits of a ``.label`` word through the ``learning_map`` (moving classes 252–259 → their static
class); unlabeled, outlier, other-structure and other-object are ignored.
"""
from __future__ import annotations

from .base import LabelClass as C
from .base import LabelSpace

SEMANTICKITTI19 = LabelSpace("semantickitti19", raw_bits=16, classes=(
    C("car", "car", ("car", "sedan"), (100, 150, 245), raw=(10, 252)),
    C("bicycle", "bicycle", ("bicycle", "bike"), (100, 230, 245), raw=(11,)),
    C("motorcycle", "motorcycle", ("motorcycle", "motorbike", "scooter"), (30, 60, 150), raw=(15,)),
    C("truck", "truck", ("truck", "lorry"), (80, 30, 180), raw=(18, 258)),
    C("other-vehicle", "other vehicle", ("bus", "trailer", "van", "tram", "caravan"), (0, 0, 255),
      raw=(13, 16, 20, 256, 257, 259)),
    C("person", "person", ("person", "pedestrian"), (255, 30, 30), raw=(30, 254)),
    C("bicyclist", "bicyclist", ("bicyclist", "cyclist", "person riding a bicycle"),
      (255, 40, 200), raw=(31, 253)),
    C("motorcyclist", "motorcyclist", ("motorcyclist", "person riding a motorcycle"),
      (150, 30, 90), raw=(32, 255)),
    C("road", "road", ("road", "street", "asphalt road"), (255, 0, 255), raw=(40, 60)),
    C("parking", "parking", ("parking lot", "parking space"), (255, 150, 255), raw=(44,)),
    C("sidewalk", "sidewalk", ("sidewalk", "pavement"), (75, 0, 75), raw=(48,)),
    C("other-ground", "other ground", ("traffic island", "curb", "median strip"), (175, 0, 75),
      raw=(49,)),
    C("building", "building", ("building", "house", "wall"), (255, 200, 0), raw=(50,)),
    C("fence", "fence", ("fence", "railing", "guard rail"), (255, 120, 50), raw=(51,)),
    C("vegetation", "vegetation", ("tree", "bush", "hedge", "vegetation"), (0, 175, 0), raw=(70,)),
    C("trunk", "trunk", ("tree trunk", "trunk"), (135, 60, 0), raw=(71,)),
    C("terrain", "terrain", ("grass", "lawn", "soil", "terrain"), (150, 240, 80), raw=(72,)),
    C("pole", "pole", ("pole", "lamp post", "street light"), (255, 240, 150), raw=(80,)),
    C("traffic-sign", "traffic sign", ("traffic sign", "road sign", "stop sign"), (255, 0, 0),
      raw=(81,)),
))
