"""3D networks: MinkUNet (14A/18/34), SPVCNN, and Clip2SceneNet (backbone + CLIP heads).

Backbones honour the ``Backbone`` contract (``backbone.py``) and are registered by name in
``BACKBONES`` (``registry.py``): a new one is one file plus one registry entry.
"""
from .backbone import Backbone, BackboneFactory, check_backbone
from .batch import VoxelBatch
from .minkunet import MINKUNET_VARIANTS, MinkUNet
from .net import Clip2SceneNet, ModelConfig, NetOutput, build_backbone, build_model
from .registry import BACKBONES
from .spvcnn import SPVCNN

__all__ = [
    "BACKBONES", "Backbone", "BackboneFactory", "MINKUNET_VARIANTS", "Clip2SceneNet", "MinkUNet",
    "ModelConfig", "NetOutput", "SPVCNN", "VoxelBatch", "build_backbone",
    "build_model", "check_backbone",
]
