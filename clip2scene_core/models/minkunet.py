"""MinkUNet (Choy et al. 2019) as in MinkowskiEngine's examples / Pointcept's ``mink_unet``.

Same layer counts, planes and module names (``conv0p1s1``, ``block1`` … ``block8``), built
on our sparse modules: a 5³ stem, four 2³/stride-2 downsamplings with residual stages, four
transposed 2³ upsamplings with skip concatenation. ``final`` (the class layer) is left out:
``Clip2SceneNet`` puts its own heads on the ``out_channels`` features.
"""
from __future__ import annotations

import torch
from torch import nn

from ..sparse import BatchNorm, Conv3d, ReLU, SparseTensor, cat
from .batch import VoxelBatch
from .blocks import BasicBlock, conv_norm_act

MINKUNET_VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "minkunet14a": {"layers": (1, 1, 1, 1, 1, 1, 1, 1), "planes": (32, 64, 128, 256, 128, 128, 96, 96)},
    "minkunet18": {"layers": (2, 2, 2, 2, 2, 2, 2, 2), "planes": (32, 64, 128, 256, 256, 128, 96, 96)},
    "minkunet34": {"layers": (2, 3, 4, 6, 2, 2, 2, 2), "planes": (32, 64, 128, 256, 256, 128, 96, 96)},
}
INIT_DIM = 32


def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class MinkUNet(nn.Module):
    """Voxel-wise backbone: ``forward(batch) → (M, out_channels)`` features per voxel."""

    point_wise = False

    def __init__(self, in_channels: int, variant: str = "minkunet34", width_multiplier: float = 1.0) -> None:
        super().__init__()
        if variant not in MINKUNET_VARIANTS:
            raise ValueError(f"unknown MinkUNet variant {variant!r}; known: {sorted(MINKUNET_VARIANTS)}")
        layers = MINKUNET_VARIANTS[variant]["layers"]
        planes = tuple(_scaled(p, width_multiplier) for p in MINKUNET_VARIANTS[variant]["planes"])
        init_dim = _scaled(INIT_DIM, width_multiplier)
        self.variant = variant
        self.inplanes = init_dim
        self.conv0p1s1 = Conv3d(in_channels, init_dim, kernel_size=5)
        self.bn0 = BatchNorm(init_dim)
        self.conv1p1s2 = Conv3d(init_dim, init_dim, kernel_size=2, stride=2)
        self.bn1 = BatchNorm(init_dim)
        self.block1 = self._make_layer(planes[0], layers[0])
        self.conv2p2s2 = Conv3d(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn2 = BatchNorm(self.inplanes)
        self.block2 = self._make_layer(planes[1], layers[1])
        self.conv3p4s2 = Conv3d(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn3 = BatchNorm(self.inplanes)
        self.block3 = self._make_layer(planes[2], layers[2])
        self.conv4p8s2 = Conv3d(self.inplanes, self.inplanes, kernel_size=2, stride=2)
        self.bn4 = BatchNorm(self.inplanes)
        self.block4 = self._make_layer(planes[3], layers[3])
        self.convtr4p16s2 = Conv3d(self.inplanes, planes[4], kernel_size=2, stride=2, transposed=True)
        self.bntr4 = BatchNorm(planes[4])
        self.inplanes = planes[4] + planes[2]
        self.block5 = self._make_layer(planes[4], layers[4])
        self.convtr5p8s2 = Conv3d(self.inplanes, planes[5], kernel_size=2, stride=2, transposed=True)
        self.bntr5 = BatchNorm(planes[5])
        self.inplanes = planes[5] + planes[1]
        self.block6 = self._make_layer(planes[5], layers[5])
        self.convtr6p4s2 = Conv3d(self.inplanes, planes[6], kernel_size=2, stride=2, transposed=True)
        self.bntr6 = BatchNorm(planes[6])
        self.inplanes = planes[6] + planes[0]
        self.block7 = self._make_layer(planes[6], layers[6])
        self.convtr7p2s2 = Conv3d(self.inplanes, planes[7], kernel_size=2, stride=2, transposed=True)
        self.bntr7 = BatchNorm(planes[7])
        self.inplanes = planes[7] + init_dim
        self.block8 = self._make_layer(planes[7], layers[7])
        self.relu = ReLU(inplace=True)
        self.out_channels = planes[7]
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = None
        if self.inplanes != planes:
            downsample = nn.Sequential(Conv3d(self.inplanes, planes, kernel_size=1), BatchNorm(planes))
        layers = [BasicBlock(self.inplanes, planes, downsample=downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """MinkowskiEngine's init: Kaiming-normal (fan_out, relu) kernels, BN γ=1, β=0."""
        for m in self.modules():
            if isinstance(m, Conv3d):
                k = m.kernel.view(-1, m.in_channels, m.out_channels)
                std = (2.0 / (m.out_channels * k.shape[0])) ** 0.5
                with torch.no_grad():
                    m.kernel.normal_(0.0, std)
            elif isinstance(m, BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_sparse(self, x: SparseTensor) -> SparseTensor:
        # conv → bn → relu triplets run through conv_norm_act (BN folded at inference)
        out_p1 = conv_norm_act(self.conv0p1s1, x, self.bn0, self.relu)
        out = conv_norm_act(self.conv1p1s2, out_p1, self.bn1, self.relu)
        out_b1p2 = self.block1(out)
        out = conv_norm_act(self.conv2p2s2, out_b1p2, self.bn2, self.relu)
        out_b2p4 = self.block2(out)
        out = conv_norm_act(self.conv3p4s2, out_b2p4, self.bn3, self.relu)
        out_b3p8 = self.block3(out)
        out = conv_norm_act(self.conv4p8s2, out_b3p8, self.bn4, self.relu)
        out = self.block4(out)
        out = conv_norm_act(self.convtr4p16s2, out, self.bntr4, self.relu)
        out = self.block5(cat([out, out_b3p8]))
        out = conv_norm_act(self.convtr5p8s2, out, self.bntr5, self.relu)
        out = self.block6(cat([out, out_b2p4]))
        out = conv_norm_act(self.convtr6p4s2, out, self.bntr6, self.relu)
        out = self.block7(cat([out, out_b1p2]))
        out = conv_norm_act(self.convtr7p2s2, out, self.bntr7, self.relu)
        return self.block8(cat([out, out_p1]))

    def forward(self, batch: VoxelBatch) -> torch.Tensor:
        return self.forward_sparse(SparseTensor(batch.features, batch.coords)).feats
