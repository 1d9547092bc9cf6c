"""VoxelBatch: a ``Voxels`` result as torch tensors on the model's device."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..voxelize import Voxels


@dataclass
class VoxelBatch:
    """Model input. Per-point rows are the kept points, scan after scan (see ``Voxels``)."""

    coords: torch.Tensor          # (M, 4) int32 [batch, x, y, z]
    features: torch.Tensor        # (M, C) float32 voxel means
    inverse: torch.Tensor         # (N_kept,) int64 point → voxel row
    point_coords: torch.Tensor    # (N_kept, 4) float32 [batch, x/vs, y/vs, z/vs]
    point_features: torch.Tensor  # (N_kept, C) float32
    batch_size: int

    @classmethod
    def from_voxels(cls, v: Voxels, device: torch.device | str = "cpu") -> "VoxelBatch":
        dev = torch.device(device)
        return cls(
            coords=torch.as_tensor(v.coords, dtype=torch.int32).to(dev),
            features=torch.as_tensor(v.features, dtype=torch.float32).to(dev),
            inverse=torch.as_tensor(v.inverse, dtype=torch.int64).to(dev),
            point_coords=torch.as_tensor(v.point_coords, dtype=torch.float32).to(dev),
            point_features=torch.as_tensor(v.point_features, dtype=torch.float32).to(dev),
            batch_size=v.batch_size,
        )

    def to(self, device: torch.device | str) -> "VoxelBatch":
        return VoxelBatch(self.coords.to(device), self.features.to(device), self.inverse.to(device),
                          self.point_coords.to(device), self.point_features.to(device), self.batch_size)

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def num_points(self) -> int:
        return int(self.inverse.shape[0])

    @property
    def point_batch(self) -> torch.Tensor:
        """(N_kept,) int64 scan index of every kept point."""
        return self.point_coords[:, 0].to(torch.int64)
