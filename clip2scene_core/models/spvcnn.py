"""SPVCNN (Tang et al. 2020): a sparse voxel U-Net plus a point branch, as in SPVNAS/torchsparse.

Module names and widths follow SPVNAS's ``SPVCNN`` (``stem``, ``stage1..4``, ``up1..4``,
``point_transforms``); the class layer is left to ``Clip2SceneNet``. The point branch runs
on the real points (``VoxelBatch.point_coords``/``point_features``), fused with the voxel
branch after the stem, the encoder, and the second and fourth decoder stages.

``head_input`` chooses what the heads read: ``"last"`` the final point features (cs[8] = 96
at full width), ``"concat"`` the released CLIP2Scene head input, the point branch's three
stages concatenated (cs[4] + cs[6] + cs[8] = 256 + 128 + 96 = 480 at full width, hence its
``Linear(480, 512)`` heads). ``dropout`` is applied after the encoder and the second decoder
stage (SPVNAS: 0.3; released CLIP2Scene: 0).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..sparse import BatchNorm, Conv3d, ReLU, SparseTensor, cat
from ..sparse.points import PointTensor, point_to_voxel, voxel_to_point
from .batch import VoxelBatch
from .blocks import (BasicConvolutionBlock, BasicDeconvolutionBlock, ResidualBlock, _in_place_ok, affine_act_,
                     run_sequential)

SPVCNN_CHANNELS = (32, 32, 64, 128, 256, 256, 128, 96, 96)
SPVCNN_DROPOUT = 0.3
HEAD_INPUTS = ("last", "concat")


class SPVCNN(nn.Module):
    """Point-wise backbone: ``forward(batch) → (N_kept, out_channels)`` features per point."""

    point_wise = True

    def __init__(self, in_channels: int, width_multiplier: float = 1.0, dropout: float = SPVCNN_DROPOUT,
                 head_input: Literal["last", "concat"] = "last") -> None:
        super().__init__()
        if head_input not in HEAD_INPUTS:
            raise ValueError(f"SPVCNN head_input must be one of {HEAD_INPUTS}, got {head_input!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SPVCNN dropout must be in [0, 1), got {dropout!r}")
        cs = [max(1, int(round(width_multiplier * c))) for c in SPVCNN_CHANNELS]
        self.stem = nn.Sequential(
            Conv3d(in_channels, cs[0], kernel_size=3, stride=1), BatchNorm(cs[0]), ReLU(True),
            Conv3d(cs[0], cs[0], kernel_size=3, stride=1), BatchNorm(cs[0]), ReLU(True))
        self.stage1 = nn.Sequential(BasicConvolutionBlock(cs[0], cs[0], ks=2, stride=2),
                                    ResidualBlock(cs[0], cs[1]), ResidualBlock(cs[1], cs[1]))
        self.stage2 = nn.Sequential(BasicConvolutionBlock(cs[1], cs[1], ks=2, stride=2),
                                    ResidualBlock(cs[1], cs[2]), ResidualBlock(cs[2], cs[2]))
        self.stage3 = nn.Sequential(BasicConvolutionBlock(cs[2], cs[2], ks=2, stride=2),
                                    ResidualBlock(cs[2], cs[3]), ResidualBlock(cs[3], cs[3]))
        self.stage4 = nn.Sequential(BasicConvolutionBlock(cs[3], cs[3], ks=2, stride=2),
                                    ResidualBlock(cs[3], cs[4]), ResidualBlock(cs[4], cs[4]))
        self.up1 = nn.ModuleList([BasicDeconvolutionBlock(cs[4], cs[5], ks=2, stride=2),
                                  nn.Sequential(ResidualBlock(cs[5] + cs[3], cs[5]), ResidualBlock(cs[5], cs[5]))])
        self.up2 = nn.ModuleList([BasicDeconvolutionBlock(cs[5], cs[6], ks=2, stride=2),
                                  nn.Sequential(ResidualBlock(cs[6] + cs[2], cs[6]), ResidualBlock(cs[6], cs[6]))])
        self.up3 = nn.ModuleList([BasicDeconvolutionBlock(cs[6], cs[7], ks=2, stride=2),
                                  nn.Sequential(ResidualBlock(cs[7] + cs[1], cs[7]), ResidualBlock(cs[7], cs[7]))])
        self.up4 = nn.ModuleList([BasicDeconvolutionBlock(cs[7], cs[8], ks=2, stride=2),
                                  nn.Sequential(ResidualBlock(cs[8] + cs[0], cs[8]), ResidualBlock(cs[8], cs[8]))])
        self.point_transforms = nn.ModuleList([
            nn.Sequential(nn.Linear(cs[0], cs[4]), nn.BatchNorm1d(cs[4]), nn.ReLU(True)),
            nn.Sequential(nn.Linear(cs[4], cs[6]), nn.BatchNorm1d(cs[6]), nn.ReLU(True)),
            nn.Sequential(nn.Linear(cs[6], cs[8]), nn.BatchNorm1d(cs[8]), nn.ReLU(True)),
        ])
        self.dropout = nn.Dropout(dropout)
        self.head_input = head_input
        self.out_channels = cs[4] + cs[6] + cs[8] if head_input == "concat" else cs[8]
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm1d,)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _point_add(self, i: int, feats: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``other + point_transforms[i](feats)``; at inference the BatchNorm, ReLU and sum run
        in place on the Linear's output (no further (N, C) point tensors)."""
        lin, bn, act = self.point_transforms[i]
        y = lin(feats)
        if isinstance(act, nn.ReLU) and affine_act_(y, bn, True):
            if _in_place_ok(other) and other.dtype == y.dtype and other.shape == y.shape:
                return y.add_(other)
            return other + y
        return other + act(bn(y))

    def forward(self, batch: VoxelBatch) -> torch.Tensor:
        # The initial voxelisation (mean of point features per voxel) is ``voxelize``'s job.
        x0 = SparseTensor(batch.features, batch.coords)
        z = PointTensor(batch.point_features, batch.point_coords)
        x0 = run_sequential(self.stem, x0)
        z0 = voxel_to_point(x0, z)
        x1 = self.stage1(point_to_voxel(x0, z0))
        x2 = self.stage2(x1)
        x3 = self.stage3(x2)
        x4 = self.stage4(x3)
        z1 = voxel_to_point(x4, z0)
        z1 = z1.replace(self._point_add(0, z0.feats, z1.feats))
        y1 = point_to_voxel(x4, z1)
        y1 = y1.replace(self.dropout(y1.feats))
        y1 = self.up1[1](cat([self.up1[0](y1), x3]))
        y2 = self.up2[1](cat([self.up2[0](y1), x2]))
        z2 = voxel_to_point(y2, z1)
        z2 = z2.replace(self._point_add(1, z1.feats, z2.feats))
        y3 = point_to_voxel(y2, z2)
        y3 = y3.replace(self.dropout(y3.feats))
        y3 = self.up3[1](cat([self.up3[0](y3), x1]))
        y4 = self.up4[1](cat([self.up4[0](y3), x0]))
        z3 = voxel_to_point(y4, z2)
        out = self._point_add(2, z2.feats, z3.feats)     # sums into a new tensor: z1, z2 intact
        if self.head_input == "concat":
            return torch.cat([z1.feats, z2.feats, out], dim=1)
        return out
