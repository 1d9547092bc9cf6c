"""The dataset readers a training config can name (``data.reader``): one entry each.

A new labelled reader is one file in this package (a ``DatasetReader`` subclass, contract in
``base.py``) plus one entry here. The key is the name configs use; the value is called with
the config's ``data.args`` as keyword arguments. Tests and plugins may add entries at run time
(``READERS["ToyReader"] = ToyReader``). Readers that need more than the core (the rosbag
reader of ``training``, which reads through ``clip2scene_ros``) are added by the caller
(``training.engine.data.build_reader``), so this package never imports ROS.
"""
from __future__ import annotations

from typing import Callable

from .base import DatasetReader
from .nuscenes import NuScenesInfoReader, NuScenesReader
from .rellis3d import Rellis3DReader
from .scannet import ScanNetReader
from .semantickitti import SemanticKittiReader

__all__ = ["READERS"]

#: ``data.reader`` name → reader class (or any callable taking ``data.args`` → DatasetReader)
READERS: dict[str, Callable[..., DatasetReader]] = {
    "NuScenesReader": NuScenesReader,
    "NuScenesInfoReader": NuScenesInfoReader,
    "SemanticKittiReader": SemanticKittiReader,
    "ScanNetReader": ScanNetReader,
    "Rellis3DReader": Rellis3DReader,
}
