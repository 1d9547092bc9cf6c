"""Clip2SceneNet: a 3D backbone plus the two 1×1 heads that map into CLIP's embedding space.

In training (``training/engine/objectives.py``) the *local* head takes the Semantic
Consistency Regularization (per point, against the text embedding of its pixel's MaskCLIP
pseudo-label, Eq. 1) and the *global* head the Semantic-guided Spatial-Temporal Consistency
(per grid cell, against the text-guided fusion of pixel and point features, Eq. 2-4); both
output ``embed_dim`` channels per point and either can classify against text embeddings.
Outputs are raw (not L2-normalised): the losses and the segmenter normalise where their
formulas need it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..voxelize import VoxelConfig
from .backbone import check_backbone
from .batch import VoxelBatch
from .registry import BACKBONES


@dataclass
class ModelConfig:
    """What ``build_model`` builds; ``in_channels`` must equal ``voxel.num_channels``.

    ``backbone`` is a name registered in ``models.registry.BACKBONES`` (minkunet14a,
    minkunet18, minkunet34, spvcnn). ``head_input`` and ``dropout`` reach backbones whose
    factory takes them (SPVCNN): ``"concat"`` puts the heads on the point branch's three
    stages concatenated (480 channels at full width, the released CLIP2Scene's
    ``Linear(480, 512)``), ``"last"`` on the final features; ``dropout`` None keeps the
    backbone's own default (SPVCNN 0.3; released CLIP2Scene 0). Checkpoints written before
    these keys existed load with the defaults, which build the same network.
    """

    backbone: str = "minkunet34"
    in_channels: int = 1
    embed_dim: int = 512              # CLIP embedding dimension (ViT-B/16: 512, RN50: 1024)
    width_multiplier: float = 1.0     # tests use small widths
    voxel: VoxelConfig = field(default_factory=VoxelConfig)
    head_input: Literal["last", "concat"] = "last"
    dropout: float | None = None

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone {self.backbone!r} is not one of {list(BACKBONES)}")
        if self.in_channels < 1 or self.embed_dim < 1:
            raise ConfigError(f"model.in_channels / embed_dim must be ≥ 1, got {self.in_channels}, {self.embed_dim}")
        if not self.width_multiplier > 0:
            raise ConfigError(f"model.width_multiplier must be > 0, got {self.width_multiplier}")
        if self.head_input not in ("last", "concat"):
            raise ConfigError(f"model.head_input must be 'last' or 'concat', got {self.head_input!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1) or null, got {self.dropout}")
        if self.voxel.num_channels != self.in_channels:
            raise ConfigError(
                f"model.in_channels={self.in_channels} but voxel.features {self.voxel.features} "
                f"give {self.voxel.num_channels} channels")


@dataclass
class NetOutput:
    """Per kept point (rows as ``VoxelBatch`` / ``Voxels.point_mask``)."""

    local: torch.Tensor     # (N_kept, D) local head: SCR, point ↔ text of its pixel pseudo-label
    global_: torch.Tensor   # (N_kept, D) global head: SSR, grid ↔ fused pixel/point features
    features: torch.Tensor  # (N_kept, F) backbone features


class Clip2SceneNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone: nn.Module = build_backbone(cfg)
        f = self.backbone.out_channels
        self.local_head = nn.Linear(f, cfg.embed_dim)
        self.global_head = nn.Linear(f, cfg.embed_dim)

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.out_channels)

    def backbone_features(self, batch: VoxelBatch) -> torch.Tensor:
        """Backbone rows: one per voxel, or per kept point when ``backbone.point_wise``.

        Inference classifies these rows directly (`clip2scene_core.classify`): a voxel's
        points share its features, so heads and labels are computed once per voxel.
        """
        if batch.features.shape[1] != self.config.in_channels:
            raise ConfigError(
                f"batch has {batch.features.shape[1]} feature channels, model expects "
                f"{self.config.in_channels} (voxel.features {self.config.voxel.features})")
        return self.backbone(batch)

    def forward(self, batch: VoxelBatch) -> NetOutput:
        feats = self.backbone_features(batch)
        local, glob = self.local_head(feats), self.global_head(feats)
        if not self.backbone.point_wise:   # heads on voxels (fewer rows), then voxel → point
            inv = batch.inverse
            feats, local, glob = feats[inv], local[inv], glob[inv]
        return NetOutput(local=local, global_=glob, features=feats)


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The registered backbone ``cfg.backbone``, randomly initialised and checked against the
    contract (``models.backbone``)."""
    factory = BACKBONES.get(cfg.backbone)
    if factory is None:
        raise ConfigError(f"model.backbone {cfg.backbone!r} is not one of {list(BACKBONES)}")
    kwargs: dict[str, object] = {"in_channels": cfg.in_channels, "width_multiplier": cfg.width_multiplier}
    options = {"head_input": cfg.head_input} if cfg.head_input != "last" else {}
    if cfg.dropout is not None:
        options["dropout"] = cfg.dropout
    if options:
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepted = {}
        missing = sorted(k for k in options if k not in accepted)
        if missing:
            raise ConfigError(f"model.backbone {cfg.backbone!r} has no option {', '.join(missing)} "
                              f"(model.{missing[0]} is an SPVCNN option)")
        kwargs.update(options)
    module = factory(**kwargs)
    return check_backbone(module, cfg.backbone)


def build_model(cfg: ModelConfig) -> Clip2SceneNet:
    """Randomly initialised network for ``cfg`` (load weights with ``load_state_dict``)."""
    return Clip2SceneNet(cfg)
