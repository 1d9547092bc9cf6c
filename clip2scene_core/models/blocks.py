"""Residual and conv blocks shared by the backbones (module names follow their origins so
published state_dicts map by name: MinkowskiEngine's BasicBlock, torchsparse/SPVNAS blocks)."""
from __future__ import annotations

from torch import nn

from ..sparse import BatchNorm, Conv3d, ReLU, SparseTensor


class BasicBlock(nn.Module):
    """MinkowskiEngine ResNet basic block: conv3-bn-relu-conv3-bn + (1×1 projection) → relu."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv1 = Conv3d(inplanes, planes, kernel_size=3, stride=stride, dilation=dilation)
        self.norm1 = BatchNorm(planes, momentum=bn_momentum)
        self.conv2 = Conv3d(planes, planes, kernel_size=3, stride=1, dilation=dilation)
        self.norm2 = BatchNorm(planes, momentum=bn_momentum)
        self.relu = ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + residual)


class BasicConvolutionBlock(nn.Module):
    """SPVNAS conv-bn-relu (``net.0`` conv, ``net.1`` bn)."""

    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(Conv3d(inc, outc, kernel_size=ks, dilation=dilation, stride=stride),
                                 BatchNorm(outc), ReLU(True))

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class BasicDeconvolutionBlock(nn.Module):
    """SPVNAS transposed conv-bn-relu."""

    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(Conv3d(inc, outc, kernel_size=ks, stride=stride, transposed=True),
                                 BatchNorm(outc), ReLU(True))

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """SPVNAS residual block; 1×1 projection when the width or stride changes."""

    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Conv3d(inc, outc, kernel_size=ks, dilation=dilation, stride=stride), BatchNorm(outc), ReLU(True),
            Conv3d(outc, outc, kernel_size=ks, dilation=dilation, stride=1), BatchNorm(outc))
        if inc == outc and stride == 1:
            self.downsample: nn.Module = nn.Identity()
        else:
            self.downsample = nn.Sequential(Conv3d(inc, outc, kernel_size=1, dilation=1, stride=stride),
                                            BatchNorm(outc))
        self.relu = ReLU(True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.relu(self.net(x) + self.downsample(x))
