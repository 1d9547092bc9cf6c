"""The contract every 3D backbone fulfils, and the check ``Clip2SceneNet`` runs on each one it builds.

A backbone is an ``nn.Module`` that turns a :class:`VoxelBatch` into feature rows:

* ``out_channels: int`` — the width F of its output rows (the heads map F → embed_dim);
* ``point_wise: bool`` — False: one row per voxel (``batch.coords``, M rows; the network
  gathers point rows through ``batch.inverse``); True: one row per kept point
  (``batch.point_coords``, N_kept rows);
* ``forward(batch: VoxelBatch) -> Tensor`` of shape (M or N_kept, out_channels).

It is built by a :data:`BackboneFactory` called with keyword arguments only
(``in_channels``, ``width_multiplier``) and registered under the name ``ModelConfig.backbone``
uses, in ``models/registry.py``. Its parameter names are what checkpoints store under
``backbone.``, so renaming a module breaks the checkpoints already written.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import ConfigError
from .batch import VoxelBatch

__all__ = ["Backbone", "BackboneFactory", "check_backbone"]


@runtime_checkable
class Backbone(Protocol):
    """What ``Clip2SceneNet`` (training, the segmenter) uses of a backbone; see the module doc."""

    out_channels: int
    point_wise: bool

    def forward(self, batch: VoxelBatch) -> torch.Tensor: ...


class BackboneFactory(Protocol):
    """Builds a randomly initialised backbone; called as ``factory(in_channels=C, width_multiplier=w)``."""

    def __call__(self, *, in_channels: int, width_multiplier: float) -> Backbone: ...


def check_backbone(module: object, name: str) -> nn.Module:
    """``module`` if it honours the contract, else a ConfigError saying what it lacks."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"backbone {name!r} built a {type(module).__name__}, not a torch nn.Module")
    width = getattr(module, "out_channels", None)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"backbone {name!r}: out_channels must be an int >= 1, got {width!r}")
    if not isinstance(getattr(module, "point_wise", None), bool):
        raise ConfigError(f"backbone {name!r}: point_wise must be True (rows per point) or False "
                          f"(rows per voxel), got {getattr(module, 'point_wise', None)!r}")
    return module
