"""SparseTensor: features on occupied voxels, with a cache shared along a network.

Coordinates follow torchsparse ≥ 2.1: ``coords`` is (M, 4) int32 ``[b, x, y, z]`` and a
tensor at stride ``s`` stores coarse coordinates ``floor(fine / s)`` (not multiples of
``s``). The ``cache`` dict object is handed from layer to layer (convolutions, norms,
``cat``) so kernel maps, lookup tables and the coordinates of every stride are built once
per batch and reused by all later layers, and transposed convolutions can find the finer
coordinates to upsample back to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidPointCloudError


@dataclass(eq=False)
class SparseCache:
    """Per-batch memo shared by every tensor derived from one input."""

    coords: dict[int, torch.Tensor] = field(default_factory=dict)   # stride → coords
    tables: dict[int, Any] = field(default_factory=dict)            # stride → lookup table
    kmaps: dict[tuple, Any] = field(default_factory=dict)           # (stride, k, s, d) → KernelMap
    extra: dict[str, Any] = field(default_factory=dict)             # backend adapters, point maps


@dataclass(eq=False)
class SparseTensor:
    """``feats`` (M, C) on the voxels ``coords`` (M, 4) int32 ``[b, x, y, z]`` at tensor ``stride``."""

    feats: torch.Tensor
    coords: torch.Tensor
    stride: int = 1
    cache: SparseCache = field(default_factory=SparseCache)

    def __post_init__(self) -> None:
        if isinstance(self.stride, (tuple, list)):
            if len(set(self.stride)) != 1:
                raise ValueError(f"only isotropic strides are supported, got {self.stride}")
            self.stride = int(self.stride[0])
        if self.coords.dim() != 2 or self.coords.shape[1] != 4:
            raise InvalidPointCloudError(f"coords must be (M, 4) [b, x, y, z], got {tuple(self.coords.shape)}")
        if self.feats.dim() != 2 or self.feats.shape[0] != self.coords.shape[0]:
            raise InvalidPointCloudError(
                f"feats {tuple(self.feats.shape)} do not match coords {tuple(self.coords.shape)}")
        if self.coords.dtype != torch.int32:
            self.coords = self.coords.to(torch.int32)
        self.cache.coords.setdefault(self.stride, self.coords)

    # torchsparse-style short names
    @property
    def F(self) -> torch.Tensor:
        return self.feats

    @property
    def C(self) -> torch.Tensor:
        return self.coords

    @property
    def device(self) -> torch.device:
        return self.feats.device

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        """Same voxels (and cache), new features: what norms, activations and heads return."""
        return SparseTensor(feats, self.coords, self.stride, self.cache)

    def __add__(self, other: "SparseTensor") -> "SparseTensor":
        if other.coords is not self.coords and other.coords.shape != self.coords.shape:
            raise ValueError("cannot add sparse tensors on different voxels")
        return self.replace(self.feats + other.feats)

    def to(self, device: torch.device | str) -> "SparseTensor":
        """Move to ``device`` (a fresh cache: maps live on the device they were built on)."""
        return SparseTensor(self.feats.to(device), self.coords.to(device), self.stride)


def cat(tensors: list[SparseTensor]) -> SparseTensor:
    """Concatenate features of tensors on the same voxels (U-Net skip connections)."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.stride != first.stride or t.coords.shape != first.coords.shape:
            raise ValueError(
                f"cat needs tensors on the same voxels: strides {t.stride} vs {first.stride}, "
                f"{tuple(t.coords.shape)} vs {tuple(first.coords.shape)}")
    return first.replace(torch.cat([t.feats for t in tensors], dim=1))
