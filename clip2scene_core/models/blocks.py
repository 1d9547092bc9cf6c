"""Residual and conv blocks shared by the backbones (module names follow their origins so
published state_dicts map by name: MinkowskiEngine's BasicBlock, torchsparse/SPVNAS blocks)."""
from __future__ import annotations

import torch
from torch import nn

from ..sparse import BatchNorm, Conv3d, ReLU, SparseTensor


def _in_place_ok(f: torch.Tensor, norm: nn.Module | None = None) -> bool:
    """Whether eval-mode inference may overwrite ``f``: no autograd, no autocast, and (for a
    norm) frozen running statistics of ``f``'s dtype."""
    if torch.is_grad_enabled() and f.requires_grad:
        return False
    if torch.is_autocast_enabled(f.device.type):
        return False
    if norm is None:
        return True
    return (isinstance(norm, nn.BatchNorm1d) and not norm.training and norm.running_mean is not None
            and norm.running_mean.dtype == f.dtype
            and not (torch.is_grad_enabled() and norm.affine and norm.weight.requires_grad))


def affine_act_(f: torch.Tensor, norm: nn.Module, relu: bool) -> bool:
    """Apply eval-mode ``norm`` (and a ReLU) to ``f`` in place, if allowed (see
    ``_in_place_ok``); False, with ``f`` untouched, where not."""
    if not _in_place_ok(f, norm):
        return False
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.affine:
        scale = scale * norm.weight
        shift = norm.bias - norm.running_mean * scale
    else:
        shift = -norm.running_mean * scale
    torch.addcmul(shift, f, scale, out=f)
    if relu:
        f.relu_()
    return True


def norm_act(x: SparseTensor, norm: nn.Module, act: nn.Module | None = None) -> SparseTensor:
    """``act(norm(x))`` for an ``x`` whose features nothing else holds (a fresh conv output).

    In eval-mode inference the norm is one in-place affine pass and the ReLU runs in place
    (no new (M, C) tensors); otherwise the modules run as usual.
    """
    if (act is None or isinstance(act, nn.ReLU)) and affine_act_(x.feats, norm, act is not None):
        return x
    y = norm(x)
    return act(y) if act is not None else y


def conv_norm_act(conv: Conv3d, x: SparseTensor, norm: nn.Module, act: nn.Module | None = None) -> SparseTensor:
    """``act(norm(conv(x)))``; at eval-mode inference the norm is folded into the conv's
    kernel (``Conv3d.forward_folded``) and the ReLU runs in place on its output."""
    if act is None or isinstance(act, nn.ReLU):
        y = conv.forward_folded(x, norm)
        if y is not None:
            if act is not None:
                y.feats.relu_()
            return y
    return norm_act(conv(x), norm, act)


def add_act(out: SparseTensor, residual: SparseTensor, act: nn.Module) -> SparseTensor:
    """``act(out + residual)`` where ``out``'s features are owned by the caller (in place at inference)."""
    if isinstance(act, nn.ReLU) and _in_place_ok(out.feats) and _in_place_ok(residual.feats) \
            and out.feats.dtype == residual.feats.dtype and out.feats.shape == residual.feats.shape:
        if residual.coords is not out.coords and residual.coords.shape != out.coords.shape:
            raise ValueError("cannot add sparse tensors on different voxels")
        out.feats.add_(residual.feats).relu_()
        return out
    return act(out + residual)


def run_sequential(seq: nn.Sequential, x: SparseTensor) -> SparseTensor:
    """``seq(x)``, with every Conv3d → BatchNorm (→ ReLU) run through ``conv_norm_act``."""
    mods = list(seq)
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, Conv3d) and i + 1 < len(mods) and isinstance(mods[i + 1], BatchNorm):
            act = mods[i + 2] if i + 2 < len(mods) and isinstance(mods[i + 2], nn.ReLU) else None
            x = conv_norm_act(m, x, mods[i + 1], act)
            i += 2 if act is None else 3
        else:
            x = m(x)
            i += 1
    return x


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
        out = conv_norm_act(self.conv1, x, self.norm1, self.relu)
        out = conv_norm_act(self.conv2, out, self.norm2)
        residual = run_sequential(self.downsample, x) if self.downsample is not None else x
        return add_act(out, residual, self.relu)


class BasicConvolutionBlock(nn.Module):
    """SPVNAS conv-bn-relu (``net.0`` conv, ``net.1`` bn)."""

    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(Conv3d(inc, outc, kernel_size=ks, dilation=dilation, stride=stride),
                                 BatchNorm(outc), ReLU(True))

    def forward(self, x: SparseTensor) -> SparseTensor:
        return run_sequential(self.net, x)


class BasicDeconvolutionBlock(nn.Module):
    """SPVNAS transposed conv-bn-relu."""

    def __init__(self, inc: int, outc: int, ks: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(Conv3d(inc, outc, kernel_size=ks, stride=stride, transposed=True),
                                 BatchNorm(outc), ReLU(True))

    def forward(self, x: SparseTensor) -> SparseTensor:
        return run_sequential(self.net, x)


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
        ds = self.downsample
        residual = run_sequential(ds, x) if isinstance(ds, nn.Sequential) else ds(x)
        return add_act(run_sequential(self.net, x), residual, self.relu)
