"""spconv twins of our MinkUNet backbones: the same network, weights and voxels on spconv's layers.

Why: the backbone speed target is stated against spconv's CPU backend *on the same stack*,
so the peer must run exactly our network (same convolutions, kernels, strides, norms,
skips) with our weights, on our voxels, and be checked to give our outputs before it is
timed. Used by `benchmarks/backbone_throughput.py` and `test/test_bench_spconv_stack.py`.

Weight layouts. Ours (torchsparse's) is ``kernel`` [K³, Cin, Cout] with the offset index
running x fastest for odd kernels (offsets −(k−1)/2 … (k−1)/2) and z fastest for even
kernels (offsets 0 … k−1), coordinates [b, x, y, z]; a 1×1×1 conv is [Cin, Cout]. spconv
2.x stores [Cout, k0, k1, k2, Cin] ("KRSC") over its index columns 1..3, here x, y, z.
`krsc_weight` converts; `dense_weight` / `dense_transposed_weight` give the same kernels
in torch's dense conv3d / conv_transpose3d layouts, so the conversion can be checked
without spconv (both index the kernel by offset the same way as spconv: input voxel
o·s + k − pad feeds output o).

spconv wants non-negative coordinates inside a ``spatial_shape``: `spconv_indices` shifts
ours by a multiple of 16 (2⁴, the four stride-2 levels), which keeps every coarse
coordinate ``floor(c / 2^l)`` a plain shift of ours, so the voxels at every level match.
The builder needs spconv (imported lazily); the layout helpers do not.
"""
from __future__ import annotations

import torch
from torch import nn

from clip2scene_core.models.blocks import BasicBlock
from clip2scene_core.models.minkunet import MinkUNet
from clip2scene_core.sparse import BatchNorm, Conv3d

GRID_ALIGN = 16     # 2 ** (number of stride-2 levels in MinkUNet)

# (our attribute name, tensor stride it runs at) of every stage, in forward order
STEM = ("conv0p1s1", "bn0")
DOWNS = (("conv1p1s2", "bn1", 1), ("conv2p2s2", "bn2", 2), ("conv3p4s2", "bn3", 4), ("conv4p8s2", "bn4", 8))
UPS = (("convtr4p16s2", "bntr4", 8), ("convtr5p8s2", "bntr5", 4), ("convtr6p4s2", "bntr6", 2),
       ("convtr7p2s2", "bntr7", 1))    # stride of the *output* (the finer level)
BLOCKS = (("block1", 2), ("block2", 4), ("block3", 8), ("block4", 16),
          ("block5", 8), ("block6", 4), ("block7", 2), ("block8", 1))


def spconv_available() -> bool:
    try:
        import spconv.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError or a broken compiled extension
        return False
    return True


def krsc_weight(conv: Conv3d, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """``conv``'s kernel (or ``kernel``, same layout) as spconv 2.x's [Cout, kx, ky, kz, Cin]."""
    k, cin, cout = conv.kernel_size, conv.in_channels, conv.out_channels
    w = (conv.kernel if kernel is None else kernel).detach()
    if w.dim() == 2:                                   # 1×1×1, stride 1: [Cin, Cout]
        return w.t().reshape(cout, 1, 1, 1, cin).contiguous()
    w = w.reshape(k, k, k, cin, cout)
    if k % 2:       # x fastest: the three kernel axes are (z, y, x)
        return w.permute(4, 2, 1, 0, 3).contiguous()
    return w.permute(4, 0, 1, 2, 3).contiguous()       # z fastest: (x, y, z)


def spconv_weight(conv: Conv3d, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """What to copy into the spconv layer's ``weight`` (shape [Cout, kx, ky, kz, Cin]).

    spconv runs a 1×1×1 stride-1 conv as one matmul with its weight's memory read as
    [Cin, Cout], not as KRSC: there the memory of our [Cin, Cout] kernel goes in as is.
    """
    w = (conv.kernel if kernel is None else kernel).detach()
    if conv.kernel_size == 1 and conv.stride == 1 and not conv.transposed:
        return w.reshape(conv.in_channels, conv.out_channels).contiguous().view(
            conv.out_channels, 1, 1, 1, conv.in_channels)
    return krsc_weight(conv, w)


def dense_weight(conv: Conv3d) -> torch.Tensor:
    """The kernel as ``torch.nn.functional.conv3d``'s weight [Cout, Cin, kx, ky, kz]."""
    return krsc_weight(conv).permute(0, 4, 1, 2, 3).contiguous()


def dense_transposed_weight(conv: Conv3d) -> torch.Tensor:
    """A transposed conv's kernel as ``conv_transpose3d``'s weight [Cin, Cout, kx, ky, kz]."""
    return krsc_weight(conv).permute(4, 0, 1, 2, 3).contiguous()


def spconv_indices(coords: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Our (M, 4) [b, x, y, z] coords shifted to spconv's non-negative grid, and its shape
    (both multiples of ``GRID_ALIGN`` per axis, so every stride-2 level lines up)."""
    xyz = coords[:, 1:].to(torch.int64)
    lo = torch.div(xyz.min(dim=0).values, GRID_ALIGN, rounding_mode="floor") * GRID_ALIGN
    span = xyz.max(dim=0).values - lo + 1
    shape = (torch.div(span + GRID_ALIGN - 1, GRID_ALIGN, rounding_mode="floor") * GRID_ALIGN).tolist()
    idx = torch.cat([coords[:, :1].to(torch.int64), xyz - lo], dim=1).to(torch.int32).contiguous()
    return idx, [int(s) for s in shape]


def randomize_norms(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (a fresh net has identity
    norms, which would hide a wrong folding or channel order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


class _Unit(nn.Module):
    """spconv conv → BatchNorm1d → optional ReLU; folded: conv → + shift → optional ReLU
    (spconv's CPU convolution takes no bias, so the folded norm's shift is one add)."""

    def __init__(self, conv: nn.Module, norm: nn.Module | None, shift: torch.Tensor | None,
                 relu: bool) -> None:
        super().__init__()
        self.conv, self.norm, self.relu = conv, norm, relu
        self.register_buffer("shift", shift)

    def forward(self, x):
        x = self.conv(x)
        f = x.features
        if self.norm is not None:
            f = self.norm(f)
        if self.shift is not None:
            f = f + self.shift
        if self.relu:
            f = torch.relu(f)
        return x.replace_feature(f)


def _unit(conv: Conv3d, norm: BatchNorm, relu: bool, key: str | None, fold: bool) -> _Unit:
    """spconv twin of ``relu?(norm(conv(x)))`` with our weights (``fold``: the eval-mode norm
    folded into the conv's kernel and a shift, as our inference path does)."""
    import spconv.pytorch as sp

    k, s, cin, cout = conv.kernel_size, conv.stride, conv.in_channels, conv.out_channels
    if conv.transposed:
        layer = sp.SparseInverseConv3d(cin, cout, k, indice_key=key, bias=False)
    elif s == 1:
        layer = sp.SubMConv3d(cin, cout, k, padding=k // 2, bias=False, indice_key=key if k > 1 else None)
    else:
        layer = sp.SparseConv3d(cin, cout, k, stride=s, padding=0, bias=False, indice_key=key)
    kernel = conv.kernel.detach()
    bn: nn.Module | None = None
    shift = None
    if fold:
        scale = (torch.rsqrt(norm.running_var + norm.eps) * norm.weight).detach()
        kernel = kernel * scale                  # Cout is the last axis of our layout
        shift = (norm.bias - norm.running_mean * scale).detach()
    else:
        bn = nn.BatchNorm1d(norm.num_features, eps=norm.eps, momentum=norm.momentum)
        bn.load_state_dict(norm.state_dict())
    with torch.no_grad():
        layer.weight.copy_(spconv_weight(conv, kernel))
    return _Unit(layer, bn, shift, relu)


class _Block(nn.Module):
    """spconv twin of `BasicBlock` (stride 1 everywhere in MinkUNet's stages)."""

    def __init__(self, block: BasicBlock, stride: int, fold: bool) -> None:
        super().__init__()
        key = f"subm{stride}"
        self.conv1 = _unit(block.conv1, block.norm1, True, key, fold)
        self.conv2 = _unit(block.conv2, block.norm2, False, key, fold)
        ds = block.downsample
        self.downsample = None if ds is None else _unit(ds[0], ds[1], False, None, fold)

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        res = x if self.downsample is None else self.downsample(x)
        return out.replace_feature(torch.relu(out.features + res.features))


def _cat(a, b):
    """Skip concatenation: an inverse conv returns its level's voxels in the order of the
    tensor that was downsampled, so rows line up."""
    return a.replace_feature(torch.cat([a.features, b.features], dim=1))


class SpconvMinkUNet(nn.Module):
    """``MinkUNet`` rebuilt from spconv layers with that net's weights; ``forward(feats,
    coords, batch_size)`` takes our voxel rows and returns (M, C) in the same row order."""

    def __init__(self, net: MinkUNet, fold: bool = False) -> None:
        super().__init__()
        self.fold = fold
        self.stem = _unit(getattr(net, STEM[0]), getattr(net, STEM[1]), True, "subm1k5", fold)
        self.downs = nn.ModuleList(_unit(getattr(net, c), getattr(net, n), True, f"down{s}", fold)
                                   for c, n, s in DOWNS)
        self.ups = nn.ModuleList(_unit(getattr(net, c), getattr(net, n), True, f"down{s}", fold)
                                 for c, n, s in UPS)
        self.blocks = nn.ModuleList(
            nn.Sequential(*(_Block(b, s, fold) for b in getattr(net, name))) for name, s in BLOCKS)
        self.eval()

    def forward(self, feats: torch.Tensor, coords: torch.Tensor, batch_size: int) -> torch.Tensor:
        import spconv.pytorch as sp

        idx, shape = spconv_indices(coords)
        x = sp.SparseConvTensor(feats, idx, shape, batch_size)
        skips = [self.stem(x)]                           # strides 1, 2, 4, 8
        out = skips[0]
        for i in range(4):
            out = self.blocks[i](self.downs[i](out))
            if i < 3:
                skips.append(out)
        for i in range(4):
            out = self.blocks[4 + i](_cat(self.ups[i](out), skips[3 - i]))
        return out.features


def build_spconv_minkunet(net: MinkUNet, fold: bool = False) -> SpconvMinkUNet:
    """spconv twin of ``net`` (eval mode; ``fold``: BatchNorm folded into the convs)."""
    if not isinstance(net, MinkUNet):
        raise TypeError(f"only MinkUNet backbones have an spconv twin, got {type(net).__name__}")
    return SpconvMinkUNet(net, fold)
