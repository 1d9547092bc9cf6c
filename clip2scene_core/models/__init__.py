"""3D networks: MinkUNet (14A/18/34), SPVCNN, and Clip2SceneNet (backbone + CLIP heads)."""
from .batch import VoxelBatch
from .minkunet import MINKUNET_VARIANTS, MinkUNet
from .net import BACKBONES, Clip2SceneNet, ModelConfig, NetOutput, build_model
from .spvcnn import SPVCNN

__all__ = [
    "BACKBONES", "MINKUNET_VARIANTS", "Clip2SceneNet", "MinkUNet", "ModelConfig", "NetOutput",
    "SPVCNN", "VoxelBatch", "build_model",
]
