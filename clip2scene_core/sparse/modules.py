"""nn.Modules over SparseTensor with torchsparse's constructor arguments and parameter names."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import functional
from .backend import backend_name, torchsparse_conv3d
from .fold import bf16_kernel, foldable, folded_weights, inference_only, resolve_sparse_precision
from .tensor import SparseTensor


def _scalar(v: int | tuple[int, ...] | list[int], name: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise ValueError(f"{name} must be isotropic, got {v}")
        v = v[0]
    return int(v)


class Conv3d(nn.Module):
    """Sparse 3D convolution; ``kernel`` is [K³, Cin, Cout] ([Cin, Cout] for a 1×1×1 stride-1
    conv) exactly as torchsparse stores it, so state_dicts are interchangeable.

    ``precision`` ("fp32" or "bf16", see ``fold.set_precision``) is the inference GEMM
    precision of the pure backend; not part of the state_dict.
    """

    precision: str = "fp32"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, bias: bool = False, transposed: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _scalar(kernel_size, "kernel_size")
        self.stride = _scalar(stride, "stride")
        self.dilation = _scalar(dilation, "dilation")
        self.transposed = bool(transposed)
        self.kernel_volume = self.kernel_size ** 3
        if self.kernel_volume > 1 or self.stride != 1:
            self.kernel = nn.Parameter(torch.zeros(self.kernel_volume, self.in_channels, self.out_channels))
        else:
            self.kernel = nn.Parameter(torch.zeros(self.in_channels, self.out_channels))
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchsparse's init: U(−1/√fan, 1/√fan), fan = C·K³ (Cout when transposed)."""
        fan = (self.out_channels if self.transposed else self.in_channels) * self.kernel_volume
        std = 1.0 / math.sqrt(fan)
        nn.init.uniform_(self.kernel, -std, std)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -std, std)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != 1:
            s += f", stride={self.stride}"
        if self.dilation != 1:
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.transposed:
            s += ", transposed=True"
        return s

    def _bf16(self, x: SparseTensor) -> bool:
        return (self.precision == "bf16" and (self.kernel_volume > 1 or self.stride != 1)
                and x.feats.device.type == "cpu"
                and x.feats.dtype == torch.float32 and inference_only(x.feats))

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.feats.shape[1] != self.in_channels:
            raise ValueError(f"{self}: input has {x.feats.shape[1]} channels")
        if backend_name(x.feats.device) == "torchsparse":
            return torchsparse_conv3d(x, self.kernel, self.kernel_size, self.bias, self.stride,
                                      self.dilation, self.transposed, self.training)
        bf16 = self._bf16(x)
        kernel = bf16_kernel(self) if bf16 else self.kernel
        return functional.conv3d(x, kernel, self.kernel_size, self.bias, self.stride,
                                 self.dilation, self.transposed, bf16)

    def forward_folded(self, x: SparseTensor, norm: nn.Module) -> SparseTensor | None:
        """``norm(self(x))`` with eval-mode ``norm`` folded into the kernel (one output pass);
        None where folding does not apply (training, autograd, autocast, torchsparse)."""
        if (x.feats.shape[1] != self.in_channels or not foldable(norm, x.feats)
                or backend_name(x.feats.device) == "torchsparse"):
            return None
        bf16 = self._bf16(x)
        kernel, bias = folded_weights(self, norm, bf16)
        return functional.conv3d(x, kernel, self.kernel_size, bias, self.stride,
                                 self.dilation, self.transposed, bf16)


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the voxel features (state_dict keys as torchsparse's BatchNorm)."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class ReLU(nn.ReLU):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


def set_precision(model: nn.Module, precision: str, device: torch.device | str = "cpu") -> str:
    """Set the inference GEMM precision of every sparse ``Conv3d`` in ``model``; returns the
    resolved one ("fp32" or "bf16"; "auto": bf16 only on CPUs with native bf16). Training
    (autograd) always runs float32 / autocast."""
    resolved = resolve_sparse_precision(precision, device)
    for m in model.modules():
        if isinstance(m, Conv3d):
            m.precision = resolved
    return resolved
